"""Anti-aliased bilinear resampling, the one rescale used by training and inference.

The filter is torch's ``interpolate(mode="bilinear", antialias=True, align_corners=False)``,
the one the models were trained with. ``resize_region`` computes any rectangle of that
result from only the source pixels it depends on, so ingest can resample a slide tile by
tile, and ``resize`` is the whole-array case. torch offers no region API (and the driver
side must not load torch), so the per-axis weights are rebuilt here as torch computes them
(``_compute_weights_aa`` in ATen's UpSampleKernel.cpp: a triangle filter widened by the
scale when downsampling, normalised over the pixels inside the image); a test checks the
result against torch's to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse


def resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w, C) of any real dtype -> (H, W, C) float32, anti-aliased bilinear."""
    pixels = np.ascontiguousarray(array, dtype=np.float32)
    if pixels.shape[:2] == tuple(shape):
        return pixels.copy() if pixels is array else pixels
    h, w = pixels.shape[:2]

    def read(y: int, x: int, rows: int, cols: int) -> np.ndarray:
        return pixels[y : y + rows, x : x + cols]

    return resize_region(read, (h, w), tuple(shape), (0, shape[0]), (0, shape[1]))


@dataclass(frozen=True)
class AxisWeights:
    """Output indices start..stop along one axis as a sparse (stop-start, src_stop-src_start)
    matrix over the source indices src_start..src_stop they read."""

    src_start: int
    src_stop: int
    matrix: scipy.sparse.csr_matrix


def axis_weights(in_size: int, out_size: int, start: int, stop: int) -> AxisWeights:
    """Weights of outputs start..stop when resizing one axis from in_size to out_size."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear: half-width 1, widened by the scale
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(start, stop) + 0.5)
    # int() in C++ truncates toward zero; the max(..., 0) makes floor and trunc agree
    lo = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64)
    width = int((hi - lo).max())
    taps = lo[:, None] + np.arange(width)[None, :]
    weights = np.clip(1.0 - np.abs((taps - centers[:, None] + 0.5) * invscale), 0.0, None)
    weights[taps >= hi[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    src_start, src_stop = int(lo.min()), int(hi.max())
    rows = np.repeat(np.arange(stop - start), width)
    matrix = scipy.sparse.csr_matrix(
        (weights.ravel(), (rows, (taps - src_start).ravel().clip(0, src_stop - src_start - 1))),
        shape=(stop - start, src_stop - src_start),
        dtype=np.float32,  # float32 products, as in torch; halves the band's memory
    )
    return AxisWeights(src_start, src_stop, matrix)


ReadRegion = Callable[[int, int, int, int], np.ndarray]  # (y, x, h, w) -> (h, w, C)


def resize_region(
    read: ReadRegion,
    src_shape: tuple[int, int],
    out_shape: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> np.ndarray:
    """Rows and columns of resize(source, out_shape) as float32 (h, w, C), reading through
    ``read`` only the source rectangle those outputs depend on."""
    ys = axis_weights(src_shape[0], out_shape[0], *rows)
    xs = axis_weights(src_shape[1], out_shape[1], *cols)
    src = read(ys.src_start, xs.src_start, ys.src_stop - ys.src_start, xs.src_stop - xs.src_start)
    src_h, src_w, channels = src.shape
    # separable: rows first (a sparse product over the flattened columns), then columns
    band = ys.matrix @ src.astype(np.float32).reshape(src_h, src_w * channels)
    band = band.reshape(-1, src_w, channels).transpose(1, 0, 2).reshape(src_w, -1)
    out = (xs.matrix @ band).reshape(cols[1] - cols[0], rows[1] - rows[0], channels)
    return np.ascontiguousarray(out.transpose(1, 0, 2), dtype=np.float32)


def block_mean(blocks: np.ndarray, axis: tuple[int, ...] | None = None) -> np.ndarray:
    """``np.mean(blocks, axis)`` in float32, for dask's coarsen (which hands each chunk
    reshaped to (n, factor) pairs, the factors' axes in ``axis``): the slices along each
    factor axis added in turn. numpy's mean over several strided axes at once walks the
    block about 5x slower (a 2000² X-ray's 2x2 means: 30 ms against 6)."""
    total = np.asarray(blocks, dtype=np.float32)
    axis = tuple(range(total.ndim)) if axis is None else axis  # None: dask asking for the dtype
    count = 1
    for a in sorted(axis, reverse=True):  # removing a later axis leaves earlier ones in place
        side = total.shape[a]
        count *= side
        index: list[slice | int] = [slice(None)] * total.ndim
        index[a] = 0
        summed = total[tuple(index)].copy()
        for i in range(1, side):
            index[a] = i
            summed += total[tuple(index)]
        total = summed
    return total / np.float32(count)
