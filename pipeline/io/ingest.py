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
``Image.read_region``: chunk x chunk when copying; when resampling, sub-blocks of the chunk
each reading at most about RESAMPLE_SOURCE_SIDE² source pixels (resample_block), whatever
the factor, with a result identical to one resample.resize_region call, which equals
resize() of the whole level to float32 rounding. Measured on a sparse uint8 TIFF: copying
16k^2 raised peak RSS by ~12 MB, resampling 8k^2 and 16k^2 by 2.5x by ~100 MB for both
(flat in the image size). An image decoded whole is held once by its reader (bounded by
max_pixels); ingest and ``preview`` read it chunk by chunk, never as a whole-image copy.

Output: zarr v3, shape (H, W, C), chunks (chunk, chunk, C) (no larger than (H, W)), no
sharding (each chunk has one writer), zarr's default zstd compression. dtype: the source dtype when the level is copied
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
from pipeline.io.resample import block_mean, resize_region


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
        # no larger than the level: a 256² level is one 256² chunk, not a padded 1024² one
        chunks=(min(chunk, target_shape[0]), min(chunk, target_shape[1]), channels),
        shards=None,
        dtype=np.float32 if resampled else image.dtype,
        fill_value=0,
        overwrite=True,
        attributes={"source_level": level, "source_shape": [height, width, channels]},
    )
    if target.nchunks == 1:
        # one chunk (an X-ray at a fixed-size model's scale): the very call dask would make
        # for its one block, without the graph; the chunk is written whole either way
        full = ((0, target_shape[0]), (0, target_shape[1]))
        target[...] = (resample_block(image, level, target_shape, *full) if resampled  # type: ignore[arg-type]
                       else image.read_region(level, 0, 0, height, width))  # fmt: skip
        return target
    source = da.from_array(
        _LevelView(image, level), chunks=(chunk, chunk, -1), asarray=False, fancy=False, name=False
    )
    if resampled:
        source = resampled_level(image, level, target_shape, chunk)
    for row in range(0, target_shape[0], chunk):
        rows = (row, min(row + chunk, target_shape[0]))
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


def lazy_regions(image: Image, level: int, chunk_hw: tuple[int, int]) -> da.Array:
    """A lazy (H, W, C) dask array over ``level`` whose chunks (``chunk_hw``: the source's
    own tiles, so each chunk decodes its tiles once) are read through ``read_region``: the
    in-place view of readers that are tile-addressable but not zarr stores (DICOM WSI,
    OpenSlide)."""
    return da.from_array(_LevelView(image, level), chunks=(*chunk_hw, -1), asarray=False,
                         fancy=False, name=False)  # fmt: skip


class _LevelView:
    """Array-like view of one level for da.from_array: slicing calls read_region, so the
    reader's bounds checks and error wrapping apply to every chunk. Passed with name=False:
    dask would otherwise hash the view, which may pickle the reader and its decoded pixels."""

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


def resampled_level(image: Image, level: int, target_hw: tuple[int, ...], chunk: int) -> da.Array:
    """resize(level, target_hw) as a lazy float32 (H, W, C) array in chunk² blocks, each
    computed from its own source rectangle (resample_block) when it is read."""
    channels = image.levels[level][2]

    def sides(length: int) -> tuple[int, ...]:
        return tuple(min(chunk, length - start) for start in range(0, length, chunk))

    def block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        rows, cols, _ = block_info[None]["array-location"]
        return resample_block(image, level, (target_hw[0], target_hw[1]), rows, cols)

    return da.map_blocks(
        block,
        chunks=(sides(target_hw[0]), sides(target_hw[1]), (channels,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
    )


def picture_source(image: Image, target_hw: tuple[int, int], chunk: int = 1024) -> da.Array:
    """The whole image at ``target_hw`` as a lazy (H, W, C) array for the store's picture:
    the level of that shape read as it is (in place, or chunk by chunk through read_region),
    else the coarsest level at least as large, resampled (resampled_level)."""
    level = picture_level(image, target_hw)
    if tuple(image.levels[level][:2]) != tuple(target_hw):
        return resampled_level(image, level, target_hw, chunk)
    return level_array(image, level, chunk)


def level_array(image: Image, level: int, chunk: int = 1024) -> da.Array:
    """A lazy (H, W, C) dask array over ``level``: the reader's own lazy view, else
    ``chunk``² chunks through read_region."""
    lazy = image.lazy_level(level)
    if lazy is not None:
        return lazy
    # chunk by chunk, not one whole-level read: that would copy a decoded-whole image
    # (8 GiB for an RGBA16 32768² PNG) next to its cache
    return da.from_array(_LevelView(image, level), chunks=(chunk, chunk, -1), asarray=False,
                         fancy=False, name=False)  # fmt: skip


def compute(lazy: da.Array) -> np.ndarray:
    """``lazy`` computed: one chunk in this thread (dask's thread pool costs more than the
    chunk), more on dask's threads."""
    return np.asarray(lazy.compute(scheduler="synchronous" if lazy.npartitions == 1 else None))


def picture_level(image: Image, target_hw: tuple[int, int]) -> int:
    """The level ``picture_source`` reads: the coarsest one at least ``target_hw`` (level 0
    when none is, the picture is then upsampled)."""
    fits = [i for i, (h, w, _) in enumerate(image.levels) if h >= target_hw[0] and w >= target_hw[1]]
    return fits[-1] if fits else 0


# The most source pixels (per axis) one resize_region call reads: a strong downsample (a
# 32768² X-ray to a 256² model: 128x) makes one output chunk depend on the whole source,
# whose float32 copy would be 4 bytes x channels per pixel (16 GiB for RGBA 32768²).
RESAMPLE_SOURCE_SIDE = 2048


def resample_block(
    image: Image, level: int, target_hw: tuple[int, int], rows: tuple[int, int],
    cols: tuple[int, int], source_side: int = RESAMPLE_SOURCE_SIDE,
) -> np.ndarray:
    """Rows x cols of resize(level, target_hw) (float32 (h, w, C)), in sub-blocks each reading
    about source_side² source pixels or less. Every output pixel is the same sum of the same
    products as in one call (resize_region's weights depend only on the output index), so
    the result is identical to computing the block at once."""
    height, width, channels = image.levels[level]

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        return image.read_region(level, y, x, h, w)

    out = np.empty((rows[1] - rows[0], cols[1] - cols[0], channels), np.float32)
    step_y = _outputs_per_read(height, target_hw[0], source_side)
    step_x = _outputs_per_read(width, target_hw[1], source_side)
    for y in range(rows[0], rows[1], step_y):
        for x in range(cols[0], cols[1], step_x):
            ys, xs = (y, min(y + step_y, rows[1])), (x, min(x + step_x, cols[1]))
            part = resize_region(read, (height, width), target_hw, ys, xs)
            out[ys[0] - rows[0] : ys[1] - rows[0], xs[0] - cols[0] : xs[1] - cols[0]] = part
    return out


def _outputs_per_read(source: int, target: int, source_side: int) -> int:
    """Output pixels along one axis whose source span fits source_side: an output reads
    about 2 x factor + 1 source pixels when downsampling by factor (torch's antialias
    triangle), and each further output factor more."""
    factor = source / target
    if factor <= 1:
        return source_side
    return max(1, math.floor(source_side / factor) - 2)


# Thumbnail for tissue detection, normalisation statistics and overlays.
PREVIEW_MAX_SIDE = 1024


def preview(image: Image, max_side: int = PREVIEW_MAX_SIDE) -> np.ndarray:
    """The whole image (for tissue detection, normalisation statistics and overlays) with its long side <= max_side (float32, (h, w, C)), averaged from
    the coarsest level still at least that large, chunk by chunk."""
    level = preview_level(image, max_side)
    h, w, _ = image.levels[level]
    lazy = level_array(image, level)
    factor = max(1, math.ceil(max(h, w) / max_side))
    trimmed = lazy[: h // factor * factor, : w // factor * factor].astype(np.float32)
    return compute(da.coarsen(block_mean, trimmed, {0: factor, 1: factor}))


def preview_level(image: Image, max_side: int = PREVIEW_MAX_SIDE) -> int:
    """The level `preview` reads whole: the coarsest one still at least max_side a side
    (level 0 for a slide without a pyramid, which makes the preview read all of it)."""
    candidates = [i for i, s in enumerate(image.levels) if max(s[:2]) >= max_side] or [0]
    return candidates[-1]
