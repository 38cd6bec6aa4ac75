"""The QC verdict every result carries (invariant 9): `pass` or `flag`, with reasons, from
what the run already has: the model's stored probabilities, the delivered (post-processed)
mask, and the plausible ranges the model card states (`ModelCard.qc`).

    measure_whole   measures of a whole working level in memory (fixed-size models: X-rays)
    measure_tiles   the same, streamed tile by tile (slides; no component counts)
    judge           measures against the card's ranges -> the verdict
    check_spec      what is wrong with a card's QC spec ([]: fine)

A finished store's verdict is pipeline.store.qc.image_qc (it reads the store; this module
is pure, and model cards use its check_spec).

Measures, by name (a class's measures carry its name: "area_fraction.lung"):
    mean_entropy          mean entropy of the predicted distribution per pixel, in bits,
                          divided by log2(classes + 1): 0 certain everywhere, 1 a coin toss
    area_fraction.<c>     the delivered mask's share of the image for class c
    components.<c>        connected components (8-connected) of class c (whole images only)
    cleaned_fraction      pixels post-processing changed, over the raw foreground's pixels

A card's spec: {"ranges": {measure: [low | null, high | null]}, "how": "how they were
chosen"}. A measure outside its range is a reason to flag; a measure the run could not
take (components on a slide) is not judged. A card without ranges passes every image
unchecked, and says so in the verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pipeline import postprocess

Verdict = Literal["pass", "flag"]
MEASURES = ("mean_entropy", "area_fraction", "components", "cleaned_fraction")


@dataclass(frozen=True)
class QcVerdict:
    """An image's QC verdict: pass or flag, why, and what was measured."""

    verdict: Verdict
    reasons: tuple[str, ...]
    measures: dict[str, float]
    checked: int  # ranges the measures were judged against (0: the card states none)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}

    @property
    def flagged(self) -> bool:
        return self.verdict == "flag"


def check_spec(spec: Any) -> list[str]:
    """What is wrong with a card's QC spec, one phrase each naming the key and value."""
    if not isinstance(spec, Mapping):
        return [f"qc must be an object, got {spec!r:.80}"]
    problems = [f"qc.{k} is not a QC key (ranges, how)" for k in spec if k not in ("ranges", "how")]
    ranges = spec.get("ranges", {})
    if not isinstance(ranges, Mapping):
        return [*problems, f"qc.ranges must be an object, got {ranges!r:.80}"]
    for name, bounds in ranges.items():
        if str(name).split(".")[0] not in MEASURES:
            problems.append(f"qc.ranges.{name} is not a measure (known: {', '.join(MEASURES)})")
        elif not (isinstance(bounds, list | tuple) and len(bounds) == 2
                  and all(b is None or _number(b) for b in bounds)):  # fmt: skip
            problems.append(f"qc.ranges.{name}={bounds!r:.60} is not [low | null, high | null]")
    return problems


def judge(measures: Mapping[str, float], spec: Mapping[str, Any]) -> QcVerdict:
    """The verdict: flag when any measure lies outside the card's range for it."""
    ranges = dict(spec.get("ranges") or {})
    reasons = []
    checked = 0
    for name, (low, high) in ranges.items():
        if name not in measures:
            continue
        checked += 1
        value = measures[name]
        if low is not None and value < low:
            reasons.append(f"{name} {_fmt(value)} < {_fmt(low)}")
        elif high is not None and value > high:
            reasons.append(f"{name} {_fmt(value)} > {_fmt(high)}")
    return QcVerdict("flag" if reasons else "pass", tuple(reasons), dict(measures), checked)


def measure_whole(probs: np.ndarray, classes: list[str], threshold: float,
                  spec: Mapping[str, Any]) -> dict[str, float]:  # fmt: skip
    """Measures of a whole working level: probs (h, w, K) as stored (foreground channels),
    with the card's post-processing `spec` applied to the mask as delivery applies it."""
    raw = labels_of(probs, threshold)
    delivered = raw
    out = {"mean_entropy": float(entropy(probs).mean())}
    if spec:
        cleaned = postprocess.clean_mask(raw == 1, spec)
        out["cleaned_fraction"] = float((cleaned != (raw == 1)).sum() / max(int((raw == 1).sum()), 1))
        delivered = cleaned.astype(np.uint8)
    for k, name in enumerate(classes, start=1):
        out[f"area_fraction.{name}"] = float((delivered == k).mean())
        out[f"components.{name}"] = float(postprocess.count_components(delivered == k))
    return _rounded(out)


def measure_tiles(blocks: Iterable[np.ndarray], classes: list[str], threshold: float,
                  total_pixels: int) -> dict[str, float]:  # fmt: skip
    """Measures streamed over the computed tiles' probabilities (any size of image): mean
    entropy over the computed pixels, area fractions over the whole image (skipped tiles
    hold no foreground). Components need the whole image and are not measured."""
    entropy_sum, seen = 0.0, 0
    counts = np.zeros(len(classes) + 1, np.int64)
    for probs in blocks:
        entropy_sum += float(entropy(probs).sum(dtype=np.float64))
        seen += probs.shape[0] * probs.shape[1]
        counts += np.bincount(labels_of(probs, threshold).ravel(), minlength=len(classes) + 1)
    out = {"mean_entropy": entropy_sum / max(seen, 1)}
    for k, name in enumerate(classes, start=1):
        out[f"area_fraction.{name}"] = float(counts[k]) / max(total_pixels, 1)
    return _rounded(out)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Per-pixel entropy (h, w) of the distribution the stored foreground channels (h, w,
    K) imply (background = 1 - their sum), in bits over log2(K + 1): in [0, 1]."""
    p = np.clip(probs.astype(np.float32), 0.0, 1.0)
    full = np.concatenate([np.clip(1.0 - p.sum(-1, keepdims=True), 0.0, 1.0), p], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(full > 0, -full * np.log2(full), 0.0)
    return terms.sum(-1) / np.log2(full.shape[-1])


def labels_of(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w) uint8 labels as delivery makes them (stitching.to_labels) from stored
    foreground channels: one channel thresholded, several arg-maxed with background."""
    if probs.shape[-1] == 1:
        return (probs[..., 0] >= threshold).astype(np.uint8)
    background = 1.0 - probs.sum(-1, keepdims=True)
    return np.concatenate([background, probs], axis=-1).argmax(-1).astype(np.uint8)


def _rounded(measures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in measures.items()}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
