"""Models by name: `build_model(arch, **config)` is the only constructor."""

from __future__ import annotations

import inspect
from typing import Any

from pipeline.errors import ConfigError
from pipeline.models.base import SegmentationModel
from pipeline.models.folding import fold_batchnorm
from pipeline.models.unet import UNet
from pipeline.models.unetpp import UNetPlusPlus

REGISTRY: dict[str, type[SegmentationModel]] = {"unet": UNet, "unetpp": UNetPlusPlus}


def build_model(arch: str, **config: Any) -> SegmentationModel:
    """Build a model by name. Config names: in_channels, classes, filters, bilinear (U-Net),
    deep_supervision, mode, prune_level (UNet++), align_corners, checkpointing."""
    try:
        cls = REGISTRY[arch]
    except KeyError:
        raise ConfigError(f"unknown arch {arch!r}; valid: {sorted(REGISTRY)}") from None
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(config) - accepted
    if unknown:
        raise ConfigError(f"{arch}: unknown config {sorted(unknown)}; valid: {sorted(accepted)}")
    return cls(**config)


__all__ = ["REGISTRY", "SegmentationModel", "UNet", "UNetPlusPlus", "build_model", "fold_batchnorm"]
