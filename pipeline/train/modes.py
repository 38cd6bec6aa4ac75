"""The UNet++ inference mode a trained model ships with (the paper's accuracy/speed trade-off).

    prune_report       Dice, IoU, parameters used and forward time in accurate mode and at
                       each prune level L1..L(depth) of a deep-supervised checkpoint
    choose_mode        the fastest mode within a Dice tolerance of the best one
    set_default_mode   rewrite the checkpoint with that mode and the table in its card
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.cards import ModelCard
from pipeline.engine.predictor import autocast_dtype
from pipeline.models import SegmentationModel, checkpoint
from pipeline.train.data import Sample
from pipeline.train.loop import evaluate


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
