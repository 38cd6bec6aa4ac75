"""Where the loop runs: one process, or `workers` DDP processes under Ray Train.

    train       the entry: fit() here for one worker, else train_ray
    train_ray   Ray Train's TorchTrainer running pipeline.train.loop.fit on each worker
                (gloo on CPU, NCCL on GPU); needs the `train` extra (ray[train])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.train.config import TrainConfig
from pipeline.train.loop import Worker, fit


def train(config: TrainConfig) -> Path:
    """Train, keep the best checkpoint (by validation Dice) and return its path: in this
    process, or on `workers` Ray Train workers."""
    if config.workers > 1:
        return train_ray(config)
    return fit(config, Worker())


def train_ray(config: TrainConfig) -> Path:
    """`workers` DDP processes under Ray Train's TorchTrainer (gloo on CPU, nccl on GPU)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=config.ray_address or os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"config": config},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(name=config.name, storage_path=str(Path(config.out).resolve() / "ray")),
    )
    trainer.fit()
    return config.checkpoint_path


def _ray_loop(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same loop, its model wrapped in DDP."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    worker = Worker(rank=context.get_world_rank(), world=context.get_world_size(),
                    device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model,
                    report=ray.train.report)
    fit(loop_config["config"], worker)
