"""The training loop: a model and its card from image/mask pairs, the same on every worker.

    fit(config, w)  data → model → epochs of (train steps, validation, best checkpoint,
                    resumable state) → the best checkpoint's path

Every random draw is seeded: model initialisation from `seed`, each training sample from
(seed, epoch, step, worker rank, index), so a run is reproducible and a resumed run goes on
exactly as an uninterrupted one would. What is written to disk is pipeline.train.state's;
where the loop runs (one process or Ray Train workers) pipeline.train.distributed's.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.engine.predictor import autocast_dtype, choose_device
from pipeline.errors import ConfigError
from pipeline.io import resize
from pipeline.models import SegmentationModel, build_model
from pipeline.train.augment import Augment, augment
from pipeline.train.config import TrainConfig
from pipeline.train.data import (
    DataSpec,
    Sample,
    build_sources,
    find_pairs,
    patch_fits,
    sample_batch,
    select_pairs,
    validation_samples,
)
from pipeline.train.losses import deep_supervision_loss, overlap_counts, overlap_scores
from pipeline.train.state import advance, load_state, new_state, save_best, save_state

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Worker:
    """Where this copy of the loop runs: its rank among `world` workers and device. Rank 0
    validates and writes files. `wrap` makes the module distributed (DDP under Ray)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=choose_device)
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module
    report: Callable[[dict[str, Any]], None] = lambda metrics: None


def fit(config: TrainConfig, worker: Worker) -> Path:
    """The training loop, the same on every worker; returns the best checkpoint's path."""
    with torch_threads(config.threads):
        return _fit(config, worker)


def _fit(config: TrainConfig, worker: Worker) -> Path:
    run = _prepare(config, worker)
    state = load_state(config, run.model, run.optimizer, run.ema) if config.resume else new_state()
    started = time.perf_counter() - state["seconds"]
    with _progress(config, worker) as bar:
        for epoch in range(state["epoch"], config.epochs):
            record = _train_epoch(run, config, worker, epoch, bar, state["best"])
            if worker.rank == 0:
                state = _end_epoch(run, config, record, state, time.perf_counter() - started)
            worker.report(record)
    return config.checkpoint_path


@dataclass
class _Run:
    """What the loop works with, built once per run (and per worker)."""

    model: SegmentationModel
    net: nn.Module  # the model's heads, DDP-wrapped under Ray
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    device: torch.device
    sources: list
    validation: list[Sample]
    transform: Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple]


def _prepare(config: TrainConfig, worker: Worker) -> _Run:
    """Data sources, validation samples (rank 0), model, optimiser, EMA, autocast."""
    spec = data_spec(config)
    sources = build_sources(training_pairs(config), spec)
    torch.manual_seed(config.seed)
    model = new_model(config)
    if config.init_weights:
        warm_start(model, config.init_weights)
    model = model.to(worker.device, memory_format=torch.channels_last)
    patch_fits(spec.sample_hw, model.multiple)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
           if config.ema else None)
    dtype = autocast_dtype(config.precision, worker.device)
    return _Run(
        model=model, net=worker.wrap(TrainingHeads(model)), optimizer=make_optimizer(config, model),
        ema=ema, scaler=torch.amp.GradScaler(worker.device.type, enabled=dtype == torch.float16),
        dtype=dtype, device=worker.device, sources=sources,
        validation=validation_set(config, sources) if worker.rank == 0 else [],
        transform=_augmenter(config.augment),
    )


def _train_epoch(run: _Run, config: TrainConfig, worker: Worker, epoch: int, bar: Any,
                 best: float) -> dict[str, Any]:
    """steps_per_epoch optimiser steps; returns the epoch's record (mean loss, lr)."""
    losses: list[float] = []
    task = bar.add_task(f"epoch {epoch + 1}/{config.epochs}", total=config.steps_per_epoch,
                        loss=math.nan, dice=best)
    run.model.train()
    for step in range(config.steps_per_epoch):
        seeds = [config.seed, epoch, step, worker.rank]
        x, y = sample_batch(run.sources, config.batch_size, seeds, run.transform)
        set_learning_rate(run.optimizer, config, epoch * config.steps_per_epoch + step)
        losses.append(train_step(run.net, run.optimizer, run.scaler, x, y, run.device, run.dtype))
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        bar.update(task, advance=1, loss=float(np.mean(losses)))
    return {"epoch": epoch + 1, "loss": float(np.mean(losses)),
            "lr": run.optimizer.param_groups[0]["lr"], "workers": worker.world}


def _end_epoch(run: _Run, config: TrainConfig, record: dict[str, Any], state: dict[str, Any],
               seconds: float) -> dict[str, Any]:
    """Validate (the EMA weights when kept), save the checkpoint if best, save the state."""
    scored = run.ema.module if run.ema is not None else run.model
    record |= evaluate(scored, run.validation, config.threshold, run.device, run.dtype)
    state = advance(state, record, seconds)
    if record["dice"] > state["best"]:
        state |= {"best": record["dice"], "best_epoch": record["epoch"]}
        save_best(config, scored, record, state)
    save_state(config, run.model, run.optimizer, run.ema, state)
    log.info("%s epoch %d/%d: loss %.4f, val dice %.4f iou %.4f, lr %.2e", config.name,
             record["epoch"], config.epochs, record["loss"], record["dice"], record["iou"], record["lr"])
    return state


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count for the block, restored after it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrainingHeads(nn.Module):
    """The model as training sees it: every deep-supervision head's logits, stacked
    (heads, N, K, H, W). A module of its own so DDP's forward hooks see the whole graph."""

    def __init__(self, model: SegmentationModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "head_logits"):
            return torch.stack(self.model.head_logits(x))
        return self.model(x)[None]


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               x: np.ndarray, y: np.ndarray, device: torch.device, dtype: torch.dtype | None) -> float:
    """One optimiser step on a batch; returns its loss."""
    images = torch.from_numpy(x).to(device, memory_format=torch.channels_last)
    target = torch.from_numpy(y).to(device)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        heads = net(images)
    loss = deep_supervision_loss(list(heads), target)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: SegmentationModel, samples: list[Sample], threshold: float,
             device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean Dice and IoU over the validation sources, each scored on its `truth` labels
    (probabilities upsampled to it as inference delivers them); patches of one source are
    pooled. The model is left in train mode only if it was."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts: dict[str, np.ndarray] = {}
    for sample in samples:
        x = torch.from_numpy(np.moveaxis(sample.image, -1, 0)[None].copy()).to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x).float()
        probs = (torch.sigmoid(logits) if model.classes == 1 else torch.softmax(logits, 1))[0]
        probs = resize(probs.permute(1, 2, 0).cpu().numpy(), sample.truth.shape)
        labels = (probs[..., 0] > threshold).astype(np.int64) if model.classes == 1 else probs.argmax(-1)
        found = overlap_counts(labels, sample.truth, model.classes)
        counts[sample.source] = counts.get(sample.source, 0) + found
    model.train(was_training)
    scores = [overlap_scores(c) for c in counts.values()]
    return {"dice": float(np.mean([s[0] for s in scores])), "iou": float(np.mean([s[1] for s in scores]))}


def validation_set(config: TrainConfig, train_sources: list | None = None) -> list[Sample]:
    """The held-out pairs' samples, else the training images' (`train_sources` if built)."""
    spec = data_spec(config)
    if config.val_images:
        pairs = select_pairs(find_pairs(config.val_images, config.val_masks), config.val_names)
        sources = build_sources(pairs, spec)
    else:
        sources = train_sources or build_sources(training_pairs(config), spec)
    return validation_samples(sources, config.val_tiles, config.seed)


# ------------------------------------------------------------------- pieces of the loop


def training_pairs(config: TrainConfig) -> list:
    """The training image/mask pairs: the folders' pairs, kept to `train_names` if given."""
    return select_pairs(find_pairs(config.images, config.masks), config.train_names)


def data_spec(config: TrainConfig) -> DataSpec:
    return DataSpec(normalization=dict(config.normalization), scale=config.scale,
                    in_channels=config.in_channels, classes=config.classes, patch=config.patch,
                    image_mpp=config.image_mpp, foreground_bias=config.foreground_bias)


def new_model(config: TrainConfig) -> SegmentationModel:
    extra = {"deep_supervision": config.deep_supervision} if config.arch == "unetpp" else {}
    return build_model(config.arch, in_channels=config.in_channels, classes=config.classes,
                       filters=list(config.filters), checkpointing=config.checkpointing, **extra)


def warm_start(model: SegmentationModel, path: str) -> None:
    """Load a checkpoint's weights into the new model (warm start); the checkpoint's mode
    does not matter: every mode keeps all weights, only the forward pass differs."""
    from pipeline.models import checkpoint

    trained, _ = checkpoint.load(path)
    if trained.arch != model.arch:
        raise ConfigError(f"{path}: init_weights is a {trained.arch!r} model, the run trains {model.arch!r}")
    try:
        model.load_state_dict(trained.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"{path}: init_weights do not fit the model: {str(exc).splitlines()[0]}") from None


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (default) or RMSprop (the UNet++ seeds' choice), decoupled weight decay."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_epochs, then constant or cosine decay to zero. A pure
    function of the global step: a resumed run needs no scheduler state."""
    total = config.epochs * config.steps_per_epoch
    warmup = min(config.warmup_epochs * config.steps_per_epoch, total - 1)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(total - warmup, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)


def _augmenter(aug: Augment) -> Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple]:
    return lambda image, labels, rng: augment(image, labels, aug, rng)


# ---------------------------------------------------------------------------- progress


class _NoBar:
    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextmanager
def _progress(config: TrainConfig, worker: Worker) -> Iterator[Any]:
    """A rich progress bar with loss and best Dice on rank 0, when asked or on a terminal."""
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    if not show or worker.rank != 0:
        yield _NoBar()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  dice {task.fields[dice]:.4f}"),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        yield bar

