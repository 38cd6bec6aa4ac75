"""A trained fixed-size model's post-processing scored, and its QC ranges chosen, on its
held-out split (the recipe's validation images), then written into its card.

    heldout_rows   per held-out image: Dice at full resolution without and with the card's
                   post-processing, and the QC measures a run would take (pipeline.qc)
    qc_ranges      the card's QC ranges from those measures (QC_RULE says how)
    calibrate      both, written into the checkpoint's card (qc, metrics)

Inference here is the engine's: whole image resized to the card's size, normalised with
the preview's statistics (pipeline.train.data.WholeSource), the card's default mode,
probabilities rounded to the store's uint8 steps before QC measures them, masks upsampled
bilinearly to full resolution and thresholded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import postprocess, qc
from pipeline.cards import ModelCard
from pipeline.io import resize
from pipeline.models import checkpoint
from pipeline.train import TrainConfig
from pipeline.train.data import Sample
from pipeline.train.loop import torch_threads, validation_set
from pipeline.train.losses import overlap_counts, overlap_scores

log = logging.getLogger(__name__)

QC_RULE = ("Chosen on the held-out split: for each measure, its 1st to 99th percentile over "
           "the held-out images widened by half that spread on each side (recipes.calibrate."
           "qc_ranges), clipped to what the measure can be; entropy and what cleaning changed "
           "have an upper bound only (a surer model is no fault); components: exactly the "
           "number post-processing keeps.")
WIDEN = 0.5  # of the 1..99 percentile spread, on each side
FRACTION_MEASURES = ("area_fraction", "cleaned_fraction", "mean_entropy")  # all in [0, 1]
UPPER_ONLY = ("cleaned_fraction", "mean_entropy")


def heldout_rows(model_path: str | Path, samples: list[Sample], spec: dict[str, Any] | None = None
                 ) -> list[dict[str, Any]]:  # fmt: skip
    """Per held-out sample: its name, Dice (raw and post-processed, at full resolution) and
    the QC measures. `spec`: post-processing to score (default: the card's)."""
    model, card = checkpoint.load(model_path)
    model.eval()
    spec = card.postprocess if spec is None else spec
    rows = []
    for sample in samples:
        probs = predict(model, sample.image)
        stored = np.rint(probs * 255) / 255  # what the store keeps and QC reads
        row = {"image": sample.source,
               "dice": _dice(probs, sample.truth, card.threshold),
               "dice_postprocessed": _dice(postprocess.apply(probs, card.threshold, spec), sample.truth,
                                           card.threshold),
               **qc.measure_whole(stored, card.class_names, card.threshold, spec)}  # fmt: skip
        rows.append(row)
    return rows


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Probabilities (h, w, 1) of one normalised working-level image (h, w, C), fp32."""
    x = torch.from_numpy(np.moveaxis(image, -1, 0)[None].copy())
    return torch.sigmoid(model(x).float())[0].permute(1, 2, 0).numpy()


def _dice(probs: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    labels = (resize(probs, truth.shape)[..., 0] > threshold).astype(np.int64)
    return float(overlap_scores(overlap_counts(labels, truth, 1))[0])


def qc_ranges(rows: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, list[float | None]]:
    """The QC ranges (QC_RULE) of the measures in `rows`."""
    ranges: dict[str, list[float | None]] = {}
    keep = spec.get("keep_largest")
    for name in rows[0]:
        if name.split(".")[0] not in qc.MEASURES:
            continue
        values = np.array([r[name] for r in rows], np.float64)
        if name.startswith("components."):
            if keep:  # the post-processing keeps `keep` components at most: fewer is implausible
                ranges[name] = [float(keep), float(keep)]
            continue
        low, high = np.percentile(values, [1, 99])
        spread = WIDEN * (high - low)
        low, high = max(low - spread, 0.0), high + spread
        if name.split(".")[0] in FRACTION_MEASURES:
            high = min(high, 1.0)
        # a lower bound at 0 checks nothing for measures that are never negative
        upper_only = low <= 0 or name.split(".")[0] in UPPER_ONLY
        ranges[name] = [None if upper_only else round(float(low), 4), round(float(high), 4)]
    return ranges


def calibrate(model_path: str | Path, config: TrainConfig) -> ModelCard:
    """Score the card's post-processing and choose its QC ranges on the recipe's held-out
    images; write both into the card (qc, metrics.heldout) and return it."""
    with torch_threads(config.threads):
        rows = heldout_rows(model_path, validation_set(config))
    model, card = checkpoint.load(model_path)
    ranges = qc_ranges(rows, card.postprocess)
    card.qc = {"ranges": ranges, "how": QC_RULE}
    verdicts = [qc.judge(r, card.qc) for r in rows]
    flagged = [(r["image"], v.reasons) for r, v in zip(rows, verdicts, strict=True) if v.flagged]
    card.metrics = {**card.metrics, "heldout": summary(rows, len(flagged))}
    for name, reasons in flagged:
        log.info("held-out %s flagged: %s", name, "; ".join(reasons))
    log.info("%s: held-out %s", model_path, card.metrics["heldout"])
    return checkpoint.save(model, card, model_path)


def summary(rows: list[dict[str, Any]], flagged: int) -> dict[str, Any]:
    """Held-out figures for the card: images, mean and 5th percentile Dice raw and post-
    processed, and the QC pass rate."""
    raw = np.array([r["dice"] for r in rows])
    cleaned = np.array([r["dice_postprocessed"] for r in rows])
    return {"images": len(rows),
            "dice": round(float(raw.mean()), 4), "dice_p5": round(float(np.percentile(raw, 5)), 4),
            "dice_postprocessed": round(float(cleaned.mean()), 4),
            "dice_postprocessed_p5": round(float(np.percentile(cleaned, 5)), 4),
            "qc_pass_rate": round(1 - flagged / len(rows), 4)}  # fmt: skip
