"""Pyramid levels, each made from the level above, chunk by chunk (dask): memory holds a
few chunks whatever the image's size (invariant 3). Level k+1 has level k's last two axes
halved, rounding up (layout.pyramid_shapes); leading axes (channels) are kept.

Two ways to halve:
- ``halve_nearest`` takes every second pixel: labels stay labels (an average of labels 1 and
  2 is no class), and level k is exactly level 0[::2^k, ::2^k] (scale 2^k, no offset);
- ``halve_mean`` averages 2x2 blocks (an odd last row or column averaged with itself): a
  picture or a probability map, where an average is what a coarser look should show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import dask.array as da
import numpy as np
import zarr
from dask.array.chunk import coarsen

from pipeline.io.resample import block_mean
from pipeline.store.checksums import decode_error

Level = TypeVar("Level", da.Array, np.ndarray)
Halve = Callable[[Level], Level]


def halve_nearest(level: Level) -> Level:
    """Every second pixel of the last two axes (a dask or a numpy array)."""
    return level[..., ::2, ::2]


def halve_mean(level: Level) -> Level:
    """2x2 means over the last two axes, in the level's dtype (integers rounded). A numpy
    level (one held in memory) goes through the very per-chunk function dask's coarsen
    applies to each chunk (dask.array.chunk.coarsen with block_mean), so both give the same
    values, without a graph."""
    lazy = isinstance(level, da.Array)
    xp = da if lazy else np
    h, w = level.shape[-2:]
    pad = [(0, 0)] * (level.ndim - 2) + [(0, h % 2), (0, w % 2)]
    even = xp.pad(level, pad, mode="edge") if h % 2 or w % 2 else level
    axes = {level.ndim - 2: 2, level.ndim - 1: 2}
    if lazy:
        # coarsen needs every chunk divisible by 2 along the halved axes
        even = even.rechunk({level.ndim - 2: _even(even.chunksize[-2]), level.ndim - 1: _even(even.chunksize[-1])})
        means = da.coarsen(block_mean, even.astype(np.float32), axes)
    else:
        means = coarsen(block_mean, even.astype(np.float32), axes)
    if np.issubdtype(level.dtype, np.integer):
        info = np.iinfo(level.dtype)
        return xp.clip(xp.rint(means), info.min, info.max).astype(level.dtype)
    return means.astype(level.dtype)


def build_levels(levels: dict[str, zarr.Array], halve: Halve, where: str) -> None:
    """Fill each of ``levels`` (by path, finest first) but the first from the one before;
    a chunk that does not decode is one StoreError naming it."""
    pairs = list(levels.items())
    above: np.ndarray | None = None
    for (name, src), (_, dst) in zip(pairs, pairs[1:], strict=False):
        try:
            above = build_level(src, dst, halve, above)
        except (RuntimeError, ValueError) as exc:  # numcodecs' zstd raises RuntimeError
            raise decode_error(where, name, src, exc) from exc


# A level at most this large is halved in memory (read once, or not at all when the level
# above was just made here) and written at once: a small image's pyramid is a handful of
# one-chunk levels, where dask's graph and a zarr read per level cost more than the pixels.
# A constant bound, so memory stays bounded whatever the image (invariant 3).
IN_MEMORY_BYTES = 16 << 20


def build_level(src: zarr.Array, dst: zarr.Array, halve: Halve,
                above: np.ndarray | None = None) -> np.ndarray | None:  # fmt: skip
    """Write ``dst`` as ``src`` halved; each of dst's chunks is written whole by one task.
    ``above``: src's pixels when the caller holds them. Returns dst's pixels when they were
    made in memory (src within IN_MEMORY_BYTES), for the next level; else None."""
    if src.nbytes <= IN_MEMORY_BYTES:
        pixels = np.asarray(src[...]) if above is None else above
        down = np.asarray(halve(pixels))  # the same values as the chunked path
        if down.shape != dst.shape:
            raise ValueError(f"halving {src.shape} gives {down.shape}, the next level is {dst.shape}")
        dst[...] = down
        return down
    down_lazy = halve(da.from_zarr(src)).rechunk(dst.chunks)
    if down_lazy.shape != dst.shape:  # a layout bug, not the data's fault
        raise ValueError(f"halving {src.shape} gives {down_lazy.shape}, the next level is {dst.shape}")
    da.store(down_lazy, dst, lock=False)
    return None


def _even(side: int) -> int:
    return max(2, side + side % 2)
