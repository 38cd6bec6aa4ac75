"""Checks of the tile grid that only tests need: who owns which chunk, what a status grid
says is left. Production code asks the store (OutputStore.tiles_to_run) instead."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.engine.tiling import Box, Tile, grid_shape
from pipeline.errors import SegpipeError
from pipeline.job import TileReport, TileStatus

if TYPE_CHECKING:
    from pipeline.store import OutputStore


def assert_single_owner(tiles: Sequence[Tile], shape_hw: tuple[int, int], chunk: int) -> None:
    """Invariant 1: every output chunk is written by exactly one tile, and only whole chunks.

    Raises SegpipeError naming the first chunk with zero or several owners.
    """
    owners = np.zeros(grid_shape(shape_hw, chunk), dtype=np.int64)
    for t in tiles:
        r = t.region
        if not _chunk_aligned(r, shape_hw, chunk):
            raise SegpipeError(f"tile {t.index}: region {r} is not aligned to {chunk=}")
        owners[r.y0 // chunk : -(-r.y1 // chunk), r.x0 // chunk : -(-r.x1 // chunk)] += 1
    bad = np.argwhere(owners != 1)
    if len(bad):
        idx = tuple(int(i) for i in bad[0])
        raise SegpipeError(f"chunk {idx} has {owners[idx]} owner tiles, expected 1")


def _chunk_aligned(box: Box, shape_hw: tuple[int, int], chunk: int) -> bool:
    h, w = shape_hw
    return (
        box.y0 % chunk == 0
        and box.x0 % chunk == 0
        and (box.y1 % chunk == 0 or box.y1 == h)
        and (box.x1 % chunk == 0 or box.x1 == w)
    )


def new_status_grid(grid_hw: tuple[int, int]) -> np.ndarray:
    """Every tile PENDING."""
    return np.full(grid_hw, TileStatus.PENDING, dtype=np.uint8)


def tiles_to_run(status: np.ndarray) -> list[tuple[int, int]]:
    """Tiles a (re-)run must still compute: PENDING or FAILED, in row-major order."""
    todo = np.isin(status, (TileStatus.PENDING, TileStatus.FAILED))
    return [(int(r), int(c)) for r, c in np.argwhere(todo)]


def set_status(
    store: OutputStore,
    index: tuple[int, int],
    status: TileStatus,
    *,
    error: str | None = None,
    attempts: int | None = None,
    seconds: float | None = None,
) -> None:
    """Record one tile in a store's status grid: a one-report ``OutputStore.set_many``."""
    store.set_many([TileReport(index, status, error, attempts, seconds)])
