"""What a run leaves on disk: the best checkpoint with its card, and the resumable state.

    save_best    the model in the card's default mode + its card (pipeline.models.checkpoint)
    save_state   model, optimiser, EMA, torch RNG, history and the run's course: a
                 `.state.pt` of plain tensors and dicts (loadable with weights_only=True),
                 written atomically after each epoch
    load_state   the same back, refused if the run's course-setting settings changed
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.cards import ModelCard, read_card
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import SegmentationModel, build_model, checkpoint
from pipeline.train.config import TrainConfig

log = logging.getLogger(__name__)

# settings that may change between a run and its resumption without changing its course
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "progress", "workers", "ray_address", "threads",
                               "postprocess"})  # the card's, applied at inference only


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
        halo=config.halo, threshold=config.threshold, modalities=list(config.modalities),
        selection=list(config.selection),
        postprocess=dict(config.postprocess),
        data=config.data, license=config.license,
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
    summary = {k: getattr(config, k) for k in keep} | {"augment": asdict(config.augment)}
    if config.init_weights:  # warm start: which weights it started from, by name and content
        card = read_card(config.init_weights)  # the card alone: warm_start loaded and checked the weights
        summary["init_weights"] = {"file": Path(config.init_weights).name,
                                   "weights_sha256": card.weights_sha256}
    return summary


def new_state() -> dict[str, Any]:
    return {"epoch": 0, "best": -1.0, "best_epoch": 0, "seconds": 0.0, "history": []}


def advance(state: dict[str, Any], record: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The state after an epoch: its record appended, the wall time so far."""
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
