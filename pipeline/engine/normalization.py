"""Input normalisation, as a model card prescribes it.

Statistics that depend on the image (percentile windows) are computed once per image from
a low-resolution view and passed to every tile: per-tile statistics would make neighbouring
tiles disagree and leave seams.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.io.image import to_channels

KINDS = ("scale", "percentile", "meanstd")


def image_stats(view: np.ndarray, spec: dict[str, Any], channels: int) -> dict[str, float]:
    """Per-image statistics needed by `normalize` (empty for fixed normalisations), over
    the view as the model sees it: `channels` channels, alpha dropped (an alpha channel
    would move the percentiles of the pixels the model gets)."""
    kind = _kind(spec)
    if kind != "percentile":
        return {}
    seen = to_channels(view, channels).astype(np.float32)
    low, high = np.percentile(seen, [spec.get("low", 1), spec.get("high", 99)])
    return {"low": float(low), "high": float(high)}


def normalize(pixels: np.ndarray, spec: dict[str, Any], stats: dict[str, float]) -> np.ndarray:
    """(h, w, C) raw pixels -> float32 model input, same shape."""
    kind = _kind(spec)
    x = pixels.astype(np.float32, copy=False)
    if kind == "scale":
        return x / np.float32(spec.get("divisor", 255.0))
    if kind == "percentile":
        low, high = stats["low"], stats["high"]
        # A flat image has high == low; map it to 0 instead of dividing by zero.
        span = np.float32(max(high - low, 1e-6))
        return np.clip((x - np.float32(low)) / span, 0.0, 1.0)
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    return (x / np.float32(spec.get("divisor", 255.0)) - mean) / std


def _kind(spec: dict[str, Any]) -> str:
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"normalization kind must be one of {KINDS}, got {kind!r}")
    return kind
