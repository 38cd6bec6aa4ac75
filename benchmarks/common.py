"""Shared pieces of the benchmark scripts: synthetic slides, tiny models, peak RSS."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import tifffile
import torch

from pipeline import checkpoint
from pipeline.checkpoint import ModelCard
from pipeline.models import build_model


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_model(path: Path, filters=(4, 8, 16), in_channels: int = 3) -> str:
    torch.manual_seed(0)
    model = build_model("unet", in_channels=in_channels, classes=1, filters=list(filters))
    checkpoint.save(model, ModelCard(arch="", config={}, name="tiny"), path)
    return str(path)


def synthetic_slide(path: Path, size: int, tile: int = 512, tissue_every: int = 1) -> Path:
    """A size×size tiled RGB TIFF written tile by tile (never held whole): textured pink
    tissue on every `tissue_every`-th tile, white elsewhere."""
    rng = np.random.default_rng(0)
    texture = np.stack([200 + rng.integers(0, 40, (tile, tile)), 80 + rng.integers(0, 60, (tile, tile)),
                        160 + rng.integers(0, 50, (tile, tile))], axis=-1).astype(np.uint8)
    white = np.full((tile, tile, 3), 245, np.uint8)
    n = -(-size // tile)

    def tiles():
        for i in range(n * n):
            yield texture if i % tissue_every == 0 else white

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="zlib", bigtiff=True)
    return path
