"""Ingest: bring one level of an image into a chunked zarr work array, or read it in place.

Which path each format takes, and why:

- DICOM, PNG, JPEG, plain (stripped) TIFF: these codecs decode the whole image at once, so
  the reader decodes it once (its size was checked against max_pixels from the header) and
  ``ingest`` copies it, resampled if asked, into a zarr array chunked like the tiles.
  Workers then read tile+halo windows from zarr instead of re-decoding the file.
- Tiled TIFF, SVS, OME-TIFF, zarr and OME-Zarr: already tile-addressable. With no
  resampling, ``read_in_place`` returns a lazy dask array over the source (tifffile's zarr
  store, or the zarr array) and nothing is copied. When the working level needs resampling
  (the slide has no level at the model's scale), ``ingest`` writes the resampled level.

``ingest`` writes one tile-row (``chunk`` output rows) at a time through dask; within a
row each output chunk is computed and written on its own, so memory is bounded by a few
chunks whatever the image size. Each output chunk reads its own source rectangle through
``Image.read_region``: chunk x chunk when copying, (chunk x factor + the filter's reach)^2
when resampling (resample.resize_region), whose result equals resize() of the whole level
to float32 rounding. Measured on a sparse uint8 TIFF: copying 16k^2 raised peak RSS by
~12 MB, resampling 8k^2 and 16k^2 by 2.5x by ~100 MB for both (flat in the image size).

Output: zarr v3, shape (H, W, C), chunks (chunk, chunk, C), no sharding (each chunk has one
writer), zarr's default zstd compression. dtype: the source dtype when the level is copied
as is (lossless and compact; DICOM is already float32), float32 when resampled.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np
import zarr
from zarr.storage import StoreLike

from pipeline.errors import InputError
from pipeline.io.image import Image
from pipeline.io.resample import resize_region


def ingest(
    image: Image,
    level: int,
    out: StoreLike,
    work_shape: tuple[int, int] | None = None,
    chunk: int = 1024,
) -> zarr.Array:
    """Write ``level`` of ``image`` (resampled to ``work_shape`` (H, W) if given and
    different) to a new zarr array at ``out`` (a path, URL or zarr store / StorePath)."""
    if not 0 <= level < len(image.levels):
        raise InputError(f"{image.path}: level {level} not in 0..{len(image.levels) - 1}")
    height, width, channels = image.levels[level]
    target_shape = tuple(work_shape) if work_shape is not None else (height, width)
    if min(target_shape) <= 0:
        raise InputError(f"{image.path}: work_shape must be positive, got {work_shape}")
    resampled = target_shape != (height, width)
    target = zarr.create_array(
        store=out,
        shape=(*target_shape, channels),
        chunks=(chunk, chunk, channels),
        shards=None,
        dtype=np.float32 if resampled else image.dtype,
        fill_value=0,
        overwrite=True,
        attributes={"source_level": level, "source_shape": [height, width, channels]},
    )
    source = da.from_array(
        _LevelView(image, level), chunks=(chunk, chunk, -1), asarray=False, fancy=False
    )
    for row in range(0, target_shape[0], chunk):
        rows = (row, min(row + chunk, target_shape[0]))
        if resampled:
            band = _resampled_band(image, level, target_shape, rows, chunk)
        else:
            band = source[rows[0] : rows[1]]
        # chunk-aligned regions: every zarr chunk is written whole by one task, no lock needed
        da.store(band, target, regions=(slice(*rows), slice(None), slice(None)), lock=False)
    return target


def read_in_place(image: Image, level: int) -> da.Array | None:
    """A lazy (H, W, C) dask array over ``level`` without copying, for tile-addressable
    sources (tiled TIFF/SVS/OME-TIFF, zarr); None for formats that need ``ingest``."""
    if not 0 <= level < len(image.levels):
        raise InputError(f"{image.path}: level {level} not in 0..{len(image.levels) - 1}")
    return image.lazy_level(level)


class _LevelView:
    """Array-like view of one level for da.from_array: slicing calls read_region, so the
    reader's bounds checks and error wrapping apply to every chunk."""

    def __init__(self, image: Image, level: int) -> None:
        self.image = image
        self.level = level
        self.shape = image.levels[level]
        self.dtype = image.dtype
        self.ndim = 3

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        rows, cols = index[0].indices(self.shape[0]), index[1].indices(self.shape[1])
        region = self.image.read_region(
            self.level, rows[0], cols[0], rows[1] - rows[0], cols[1] - cols[0]
        )
        return region[:, :, index[2]] if len(index) > 2 else region


def _resampled_band(
    image: Image, level: int, target_shape: tuple[int, ...], rows: tuple[int, int], chunk: int
) -> da.Array:
    """Rows ``rows`` of resize(level, target_shape), each block computed from its own
    source rectangle."""
    height, width, channels = image.levels[level]
    col_chunks = tuple(min(chunk, target_shape[1] - c) for c in range(0, target_shape[1], chunk))

    def block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]

        def read(y: int, x: int, h: int, w: int) -> np.ndarray:
            return image.read_region(level, y, x, h, w)

        return resize_region(
            read, (height, width), target_shape[:2], (rows[0] + r0, rows[0] + r1), (c0, c1)
        )

    return da.map_blocks(
        block,
        chunks=((rows[1] - rows[0],), col_chunks, (channels,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )


# Thumbnail for tissue detection, normalisation statistics and overlays.
PREVIEW_MAX_SIDE = 1024


def preview(image: Image, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """The whole image (for tissue detection, normalisation statistics and overlays) with its long side <= max_side (float32, (h, w, C)), averaged from
    the coarsest level still at least that large, chunk by chunk."""
    candidates = [i for i, s in enumerate(image.levels) if max(s[:2]) >= max_side] or [0]
    level = candidates[-1]
    h, w, c = image.levels[level]
    lazy = image.lazy_level(level)
    if lazy is None:
        lazy = da.from_array(image.read_region(level, 0, 0, h, w), chunks=(1024, 1024, c))
    factor = max(1, math.ceil(max(h, w) / max_side))
    trimmed = lazy[: h // factor * factor, : w // factor * factor].astype(np.float32)
    return np.asarray(da.coarsen(np.mean, trimmed, {0: factor, 1: factor}).compute())
