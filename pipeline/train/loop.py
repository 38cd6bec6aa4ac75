"""Training: a model and its card from image/mask pairs, on one process or Ray Train workers.

    train(config)   data → model → epochs of (train steps, validation, best checkpoint,
                    resumable state) → the best checkpoint's path

Every random draw is seeded: model initialisation from `seed`, each training sample from
(seed, epoch, step, worker rank, index), so a run is reproducible and a resumed run goes on
exactly as an uninterrupted one would. The best checkpoint (by validation Dice) is written
with `pipeline.checkpoint.save`, its card carrying everything inference needs: normalisation,
scale, classes, threshold, default mode. The resumable state is a separate `.state.pt` of
plain tensors and dicts (loadable with weights_only=True).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.cards import ModelCard
from pipeline.engine.predictor import autocast_dtype, choose_device
from pipeline.errors import CheckpointError, ConfigError
from pipeline.io import resize
from pipeline.models import SegmentationModel, build_model, checkpoint
from pipeline.train.augment import Augment, augment
from pipeline.train.data import (
    DataSpec,
    Sample,
    build_sources,
    find_pairs,
    patch_fits,
    sample_batch,
    validation_samples,
)
from pipeline.train.losses import deep_supervision_loss, overlap_counts, overlap_scores

log = logging.getLogger(__name__)

Optimizer = Literal["adamw", "rmsprop"]
Schedule = Literal["cosine", "constant"]
# settings that may change between a run and its resumption without changing its course
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "progress", "workers", "ray_address", "threads"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the CLI maps its options one to one onto these.

    Data: `images` and `masks` are two folders (paired by name) or two files; `val_images`
    and `val_masks` likewise, else validation uses the training images (and says so).
    Scale: `size` (h, w) resizes whole images (X-rays); else `mpp` picks the slide level and
    patches of `patch` px are sampled from it (`image_mpp` for files without a pixel size).
    """

    images: str
    masks: str
    out: str = "runs/train"
    name: str = "model"
    val_images: str | None = None
    val_masks: str | None = None
    val_tiles: int = 8  # validation patches per large image
    # model
    arch: str = "unetpp"
    filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    in_channels: int = 3
    classes: int = 1
    class_names: tuple[str, ...] = ("foreground",)
    deep_supervision: bool = True
    checkpointing: bool = False  # activation checkpointing: less memory, ~30% more time
    # data at the model's scale
    size: tuple[int, int] | None = None
    mpp: float | None = None
    image_mpp: float | None = None
    patch: int = 256
    foreground_bias: float = 0.0
    normalization: dict[str, Any] = field(
        default_factory=lambda: {"kind": "percentile", "low": 1, "high": 99})
    augment: Augment = field(default_factory=Augment)
    # optimisation
    epochs: int = 50
    steps_per_epoch: int = 20
    batch_size: int = 4
    optimizer: Optimizer = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    warmup_epochs: int = 1
    ema: float = 0.0  # decay of the weights' exponential moving average per step; 0: off
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    # CPU threads for torch (None: torch's default). On a shared machine 1 is much faster
    # than 2: OpenMP threads that wait on a busy core spin (measured 0.9 s vs 7 s per step)
    threads: int | None = None
    workers: int = 1  # > 1: Ray Train TorchTrainer with DDP
    ray_address: str | None = None
    resume: bool = False
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    # card
    data: str = ""
    license: str = ""
    threshold: float = 0.5
    mode: str = "accurate"  # UNet++ default inference mode written to the card
    prune_level: int | None = None
    tile: int | None = None
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.mpp is not None:
            raise ConfigError("give the model's scale as size or mpp, not both")
        for name in ("epochs", "steps_per_epoch", "batch_size", "workers", "patch", "val_tiles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "rmsprop"):
            raise ConfigError(f"optimizer must be adamw or rmsprop, got {self.optimizer=}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule must be cosine or constant, got {self.schedule=}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema decay must be in [0, 1), got {self.ema=}")
        if not 0.0 <= self.foreground_bias <= 1.0:
            raise ConfigError(f"foreground_bias must be in [0, 1], got {self.foreground_bias=}")
        names = 1 if self.classes == 1 else self.classes - 1
        if len(self.class_names) != names:
            raise ConfigError(f"{self.classes=} needs {names} foreground class_names, "
                              f"got {list(self.class_names)}")
        if self.augment.photometric and self.normalization.get("kind") == "meanstd":
            raise ConfigError("photometric augmentation needs [0, 1] inputs: use percentile or "
                              "scale normalisation, or turn brightness/contrast/gamma/hsv/stain off")

    @property
    def scale(self) -> dict[str, Any] | None:
        if self.size is not None:
            return {"size": [int(s) for s in self.size]}
        return {"mpp": float(self.mpp)} if self.mpp is not None else None

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out) / f"{self.name}.safetensors"

    @property
    def state_path(self) -> Path:
        return Path(self.out) / f"{self.name}.state.pt"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train(config: TrainConfig) -> Path:
    """Train, keep the best checkpoint (by validation Dice) and return its path."""
    if config.workers > 1:
        return _train_ray(config)
    return fit(config, Worker())


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
    sources = build_sources(find_pairs(config.images, config.masks), spec)
    torch.manual_seed(config.seed)
    model = new_model(config).to(worker.device, memory_format=torch.channels_last)
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
    state = _advance(state, record, seconds)
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
        sources = build_sources(find_pairs(config.val_images, config.val_masks), spec)
    else:
        sources = train_sources or build_sources(find_pairs(config.images, config.masks), spec)
    return validation_samples(sources, config.val_tiles, config.seed)


# ------------------------------------------------------------ UNet++ inference modes


def prune_report(path: str | Path, samples: list[Sample], repeats: int = 5,
                 precision: str = "auto") -> list[dict[str, Any]]:
    """Dice, IoU, parameters used and forward time per sample of a deep-supervised UNet++
    checkpoint in accurate mode and at each prune level L1..L(depth) (the paper's trade-off)."""
    model, card = checkpoint.load(path)
    device = torch.device("cpu")
    dtype = autocast_dtype(precision, device)
    rows = []
    for mode, level in [("accurate", None), *(("fast", lv) for lv in range(1, model.depth + 1))]:
        model.set_mode(mode, level)
        scores = evaluate(model, samples, card.threshold, device, dtype)
        rows.append({"mode": mode, "prune_level": model.prune_level if mode == "fast" else None,
                     "dice": round(scores["dice"], 4), "iou": round(scores["iou"], 4),
                     "params": _params_used(model),
                     "ms": round(1000 * _forward_seconds(model, samples[0].image, dtype, repeats), 1)})
    return rows


def choose_mode(rows: list[dict[str, Any]], tolerance: float = 0.005) -> tuple[str, int | None]:
    """The fastest mode whose Dice is within `tolerance` of the best one's."""
    best = max(r["dice"] for r in rows)
    fastest = min((r for r in rows if r["dice"] >= best - tolerance), key=lambda r: r["ms"])
    return fastest["mode"], fastest["prune_level"]


def set_default_mode(path: str | Path, mode: str, prune_level: int | None,
                     table: list[dict[str, Any]]) -> ModelCard:
    """Rewrite a checkpoint with another default inference mode and its prune table."""
    model, card = checkpoint.load(path)
    model.set_mode(mode, prune_level)
    card.metrics = {**card.metrics, "prune_levels": table}
    return checkpoint.save(model, card, path)


def _params_used(model: SegmentationModel) -> int:
    """Parameters of the nodes and head the current mode computes."""
    if model.mode == "accurate":
        return sum(p.numel() for p in model.parameters())
    level = model.prune_level
    used = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "nodes":
            i, j = map(int, parts[1].removeprefix("x_").split("_"))
            used += p.numel() if i + j <= level else 0
        elif parts[0] == "heads":
            used += p.numel() if int(parts[1]) == level - 1 else 0
    return used


@torch.no_grad()
def _forward_seconds(model: nn.Module, image: np.ndarray, dtype: torch.dtype | None, repeats: int) -> float:
    """Median wall time of one forward pass on one sample, after a warm-up pass."""
    x = torch.from_numpy(np.moveaxis(image, -1, 0)[None].copy())
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


# ------------------------------------------------------------------- pieces of the loop


def data_spec(config: TrainConfig) -> DataSpec:
    return DataSpec(normalization=dict(config.normalization), scale=config.scale,
                    in_channels=config.in_channels, classes=config.classes, patch=config.patch,
                    image_mpp=config.image_mpp, foreground_bias=config.foreground_bias)


def new_model(config: TrainConfig) -> SegmentationModel:
    extra = {"deep_supervision": config.deep_supervision} if config.arch == "unetpp" else {}
    return build_model(config.arch, in_channels=config.in_channels, classes=config.classes,
                       filters=list(config.filters), checkpointing=config.checkpointing, **extra)


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


# --------------------------------------------------------------- checkpoint and state


def save_best(config: TrainConfig, model: SegmentationModel, record: dict[str, Any],
              state: dict[str, Any]) -> ModelCard:
    """Write the model (in the card's default mode) and its card."""
    extra = {"mode": config.mode, "prune_level": config.prune_level} if config.arch == "unetpp" else {}
    shipped = build_model(model.arch, **{**model.config, **extra})
    shipped.load_state_dict(model.state_dict())
    validated_on = "held-out images" if config.val_images else "the training images (no held-out set given)"
    card = ModelCard(
        arch=model.arch, config={}, name=config.name, class_names=list(config.class_names),
        normalization=dict(config.normalization), scale=config.scale, tile=config.tile,
        halo=config.halo, threshold=config.threshold, data=config.data, license=config.license,
        metrics={"val_dice": round(record["dice"], 4), "val_iou": round(record["iou"], 4),
                 "validated_on": validated_on, "epoch": record["epoch"],
                 "train_seconds": round(state["seconds"], 1),
                 "params": sum(p.numel() for p in model.parameters()),
                 "training": _training_summary(config)},
    )
    return checkpoint.save(shipped, card, config.checkpoint_path)


def _training_summary(config: TrainConfig) -> dict[str, Any]:
    """The settings that made the model, minus local paths."""
    keep = ("epochs", "steps_per_epoch", "batch_size", "optimizer", "lr", "weight_decay",
            "schedule", "ema", "patch", "seed", "precision")
    return {k: getattr(config, k) for k in keep} | {"augment": asdict(config.augment)}


def new_state() -> dict[str, Any]:
    return {"epoch": 0, "best": -1.0, "best_epoch": 0, "seconds": 0.0, "history": []}


def _advance(state: dict[str, Any], record: dict[str, Any], seconds: float) -> dict[str, Any]:
    return state | {"epoch": record["epoch"], "seconds": seconds, "history": [*state["history"], record]}


def save_state(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
               ema: AveragedModel | None, state: dict[str, Any]) -> None:
    """Write the resumable state (atomically: a crash mid-write keeps the previous one)."""
    payload = {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else {},
        "torch_rng": torch.get_rng_state(),
        "config": json.dumps(_course(config), sort_keys=True),
    }
    path = config.state_path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def load_state(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
               ema: AveragedModel | None) -> dict[str, Any]:
    """Restore model, optimiser, EMA and RNG from the state file; a fresh state if none."""
    path = config.state_path
    if not path.is_file():
        log.info("%s: no training state yet; starting from epoch 1", path)
        return new_state()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"{path}: unreadable training state ({type(exc).__name__}: {exc})") from None
    saved = json.loads(payload["config"])
    changed = sorted(k for k, v in _course(config).items() if saved.get(k) != v)
    if changed:
        raise ConfigError(f"{path}: state was trained with other settings {changed}; "
                          "start a new run (another name or out) or restore them")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if ema is not None and payload["ema"]:
        ema.load_state_dict(payload["ema"])
    torch.set_rng_state(payload["torch_rng"])
    log.info("%s: resuming after epoch %d", path, payload["epoch"])
    return {k: payload[k] for k in new_state()}


def _course(config: TrainConfig) -> dict[str, Any]:
    """The settings that determine the run's course, as JSON-comparable values."""
    plain = json.loads(json.dumps(config.to_dict(), default=str))
    return {k: v for k, v in plain.items() if k not in RESUMABLE_CHANGES}


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


# -------------------------------------------------------------------------- Ray Train


def _train_ray(config: TrainConfig) -> Path:
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
