"""What the driver, the scheduler and the workers say to each other about an image and
its tiles: small, picklable facts, never pixels. Torch-free, so the driver side (flows,
the scheduler, the store) never loads the model's engine to name a job.

    ImageJob     what any worker needs to compute any tile of one image
    TileStatus   a tile's state in the output's status grid
    TileReport   what a worker returns for one tile, and the driver records
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np


class TileStatus(IntEnum):
    """A tile's state in the output's status grid (stored as uint8)."""

    PENDING = 0
    DONE = 1
    SKIPPED = 2
    FAILED = 3


def is_complete(status: np.ndarray) -> bool:
    """Invariant 5: an image is complete only when every tile is DONE or SKIPPED."""
    return bool(np.isin(status, (TileStatus.DONE, TileStatus.SKIPPED)).all())


@dataclass(frozen=True)
class TileReport:
    """What the driver records for one tile; workers return these, never pixels."""

    index: tuple[int, int]
    status: TileStatus
    error: str | None = None  # required for FAILED
    attempts: int | None = None  # FAILED: how often the tile was tried (None: 1)
    seconds: float | None = None
    windows: int | None = None  # model inputs the tile ran (DONE)


@dataclass(frozen=True)
class ImageJob:
    """What any worker needs to compute any tile of one image: small, picklable facts."""

    image_id: str
    input_path: str
    store_path: str
    full_hw: tuple[int, int]
    work_hw: tuple[int, int]
    tile: int
    halo: int  # already on the model's grid (tiling.effective_halo)
    kind: str = "xray"  # "xray" or "slide" (pipeline.io.Image.kind)
    norm_stats: dict[str, float] = field(default_factory=dict)
    work_url: str | None = None  # ingested working level (zarr); None: read the source in place
    source_level: int = 0

    def open_work(self) -> Any:
        """The working-level (H, W, C) array: the ingested zarr array, or the source level."""
        if self.work_url is not None:
            import zarr

            return zarr.open_array(self.work_url, mode="r")
        from pipeline.io import open_image

        return open_image(self.input_path).lazy_level(self.source_level)
