"""Tile geometry: the tile grid, the windows a tile runs, and the full-resolution mapping.

Pure functions over plain data. Coordinates are (y, x) at the working level unless a name
says `full`; every box is half-open. Nothing here reads pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ConfigError

# Full-resolution chunk when tile*scale is not an integer: ownership (full_res_owned) is
# correct for any chunk size, so this only sets write granularity (256 KiB of uint8).
DEFAULT_FULL_CHUNK = 512
# The largest full-resolution chunk side, and the side of the pieces a tile delivers its
# full-resolution mask in (invariant 3): a piece's float32 probabilities are 16 MiB per
# class, its labels 4 MiB, whatever the model's scale. tile*scale alone is unbounded (a
# 256² X-ray model on a 32768² image: 1024*128, a 1 GiB chunk).
MAX_FULL_CHUNK = 2048


@dataclass(frozen=True)
class Box:
    """A half-open rectangle [y0, y1) x [x0, x1); empty when y1 == y0 or x1 == x0."""

    y0: int
    x0: int
    y1: int
    x1: int

    def __post_init__(self) -> None:
        if self.y1 < self.y0 or self.x1 < self.x0:
            raise ValueError(f"inverted box {self}")

    @property
    def h(self) -> int:
        return self.y1 - self.y0

    @property
    def w(self) -> int:
        return self.x1 - self.x0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.h, self.w)

    @property
    def is_empty(self) -> bool:
        return self.h == 0 or self.w == 0

    def slices(self) -> tuple[slice, slice]:
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def shift(self, dy: int, dx: int) -> Box:
        return Box(self.y0 + dy, self.x0 + dx, self.y1 + dy, self.x1 + dx)

    def relative_to(self, origin: Box) -> Box:
        """This box in the coordinates of `origin` (e.g. a keep inside its window input)."""
        return self.shift(-origin.y0, -origin.x0)

    def intersect(self, other: Box) -> Box | None:
        """The common part, or None when the boxes share no pixel."""
        y0, x0 = max(self.y0, other.y0), max(self.x0, other.x0)
        y1, x1 = min(self.y1, other.y1), min(self.x1, other.x1)
        if y1 <= y0 or x1 <= x0:
            return None
        return Box(y0, x0, y1, x1)

    def contains(self, other: Box) -> bool:
        return (
            self.y0 <= other.y0
            and self.x0 <= other.x0
            and other.y1 <= self.y1
            and other.x1 <= self.x1
        )


def bounding_box(boxes: Iterable[Box]) -> Box:
    """The smallest box holding every box (e.g. the input a tile reads for its windows)."""
    boxes = list(boxes)
    if not boxes:
        raise ValueError("bounding_box of no boxes")
    return Box(
        min(b.y0 for b in boxes),
        min(b.x0 for b in boxes),
        max(b.y1 for b in boxes),
        max(b.x1 for b in boxes),
    )


def full_box(shape_hw: tuple[int, int]) -> Box:
    return Box(0, 0, shape_hw[0], shape_hw[1])


# ---------------------------------------------------------------------------------------
# The tile grid


@dataclass(frozen=True)
class Tile:
    """One unit of work: the output pixels `region` (chunk-aligned) it owns and writes.

    `size` is the grid's tile size; border tiles have smaller regions, and the window
    planner splits every tile too large for one window by that nominal size, so all
    tiles' sub-windows have the same shape, except at the image's edge.
    """

    index: tuple[int, int]
    region: Box
    size: int


def grid_shape(shape_hw: tuple[int, int], tile: int) -> tuple[int, int]:
    """Rows and columns of the tile grid (ceil division; the last row/column may be short)."""
    _check_tile(tile)
    h, w = shape_hw
    return (-(-h // tile), -(-w // tile))


def plan_tiles(shape_hw: tuple[int, int], tile: int) -> list[Tile]:
    """The tile grid, which is the output array's chunk grid: chunk (r, c) == tile (r, c)."""
    h, w = shape_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"image shape must be positive, got {shape_hw=}")
    rows, cols = grid_shape(shape_hw, tile)
    return [
        Tile(
            (r, c),
            Box(r * tile, c * tile, min((r + 1) * tile, h), min((c + 1) * tile, w)),
            tile,
        )
        for r in range(rows)
        for c in range(cols)
    ]


def _check_tile(tile: int) -> None:
    if tile <= 0:
        raise ConfigError(f"tile must be positive, got {tile=}")


# ---------------------------------------------------------------------------------------
# Crop blend: windows whose input is the keep grown by the halo


@dataclass(frozen=True)
class Window:
    """One model input (`input`) and the owned output pixels it provides (`keep`)."""

    input: Box
    keep: Box


def effective_halo(halo: int, multiple: int) -> int:
    """The halo rounded UP to the model's multiple, so window starts stay on its grid."""
    if halo < 0:
        raise ConfigError(f"halo must be >= 0, got {halo=}")
    return _align_up(halo, multiple)


def crop_windows(
    tile: Tile, shape_hw: tuple[int, int], halo: int, multiple: int, max_window: int
) -> list[Window]:
    """The windows that compute `tile` exactly as whole-image inference would.

    Per axis: every input is its keep grown by the halo (rounded up to the grid), starting
    on the `multiple` grid and clipped to the image, and no larger: a border tile reads
    only what it needs, not a window shifted inward to the interior tiles' size (at 2048²
    with tile 1024 and halo 64 that is 11% fewer pixels; for an image barely larger than
    one tile, 3x fewer). The model pads bottom/right to `multiple` itself; an input that
    ends at the image edge has the image's length modulo `multiple`, so it is padded with
    the same rows as the whole image. An input longer than `max_window` splits the tile
    into sub-keeps that partition it.
    """
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple=}")
    h = effective_halo(halo, multiple)
    r = tile.region
    rows = _axis_windows(r.y0, r.y1, shape_hw[0], tile.size, h, multiple, max_window)
    cols = _axis_windows(r.x0, r.x1, shape_hw[1], tile.size, h, multiple, max_window)
    return [
        Window(input=Box(iy0, ix0, iy1, ix1), keep=Box(ky0, kx0, ky1, kx1))
        for (ky0, ky1, iy0, iy1) in rows
        for (kx0, kx1, ix0, ix1) in cols
    ]


def _axis_windows(
    a: int, b: int, length: int, size: int, halo: int, multiple: int, max_window: int
) -> list[tuple[int, int, int, int]]:
    """(keep start, keep end, input start, input end) along one axis for keep [a, b)."""
    # A keep measured from its aligned-down start; a tile size off the model's grid makes
    # that up to multiple-1 longer than the tile.
    slack = multiple - 1 if size % multiple else 0
    span = _align_up(size + slack, multiple)
    parts = [(a, b)]
    if length > max_window and span + 2 * halo > max_window:
        span = _split_span(span, halo, multiple, max_window)
        cuts = range(_align_down(a, multiple) + span, b, span)
        edges = [a, *cuts, b]
        parts = list(zip(edges[:-1], edges[1:], strict=True))
    return [(ka, kb, *_input_span(ka, kb, length, halo, multiple)) for ka, kb in parts]


def _input_span(ka: int, kb: int, length: int, halo: int, multiple: int) -> tuple[int, int]:
    """Input [start, end) for keep [ka, kb): grown by the halo, on the grid, clipped."""
    start = max(0, _align_down(ka - halo, multiple))
    end = min(length, _align_up(kb + halo, multiple))
    # Only with halo 0 can an input at the image edge be narrower than the model's padding
    # there; reflect padding needs more rows than it adds (else pad_to_multiple replicates,
    # unlike the whole image), so such a sliver reads one grid step further back.
    if end - start < multiple:
        start = max(0, start - multiple)
    return start, end


def _split_span(span: int, halo: int, multiple: int, max_window: int) -> int:
    """The sub-keep length: equal parts of `span`, each with its halo within max_window."""
    limit = _align_down(max_window - 2 * halo, multiple)
    if limit < multiple:
        raise ConfigError(
            f"max_window={max_window} leaves no room for a keep with halo={halo} "
            f"on the model's grid of {multiple}"
        )
    parts = -(-span // limit)
    return _align_up(-(-span // parts), multiple)


def _align_down(v: int, multiple: int) -> int:
    return v // multiple * multiple


def _align_up(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


# ---------------------------------------------------------------------------------------
# Gaussian blend: windows on one global grid, weighted by an importance map


def gaussian_windows(
    shape_hw: tuple[int, int], window: int | tuple[int, int], overlap: float
) -> list[Box]:
    """The global sliding-window grid (as MONAI / nnU-Net): row-major boxes.

    Per axis the starts are 0, stride, 2*stride, ... and a last one at length-window so
    the end is covered; an axis shorter than the window gets one window of its length.
    """
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap=}")
    wy, wx = (window, window) if isinstance(window, int) else window
    ys = _axis_starts(shape_hw[0], wy, overlap)
    xs = _axis_starts(shape_hw[1], wx, overlap)
    return [Box(y, x, y + ly, x + lx) for y, ly in ys for x, lx in xs]


def _axis_starts(length: int, window: int, overlap: float) -> list[tuple[int, int]]:
    """(start, window length) pairs along one axis."""
    if window <= 0:
        raise ConfigError(f"window must be positive, got {window=}")
    if length <= window:
        return [(0, length)]
    stride = max(1, int(window * (1 - overlap)))
    starts = [*range(0, length - window, stride), length - window]
    return [(s, window) for s in starts]


def windows_touching(tile: Tile, windows: Iterable[Box]) -> list[Box]:
    """The windows sharing a pixel with the tile's region: all a tile needs to blend."""
    return [w for w in windows if tile.region.intersect(w) is not None]


def gaussian_importance(window_hw: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """A centred gaussian (sigma = sigma_scale * size per axis), max 1, float32.

    Values that underflow to 0 are raised to the smallest positive one (as nnU-Net), so the
    sum of weights is never 0 where windows overlap only at their edges.
    """
    if sigma_scale <= 0:
        raise ConfigError(f"sigma_scale must be positive, got {sigma_scale=}")
    g = np.outer(_gaussian_1d(window_hw[0], sigma_scale), _gaussian_1d(window_hw[1], sigma_scale))
    g = (g / g.max()).astype(np.float32)
    positive = g[g > 0]
    g[g <= 0] = positive.min()
    return g


def _gaussian_1d(n: int, sigma_scale: float) -> np.ndarray:
    # Centred at (n-1)/2 so the map is exactly symmetric for even and odd sizes.
    d = np.arange(n, dtype=np.float64) - (n - 1) / 2
    return np.exp(-0.5 * (d / (sigma_scale * n)) ** 2)


# ---------------------------------------------------------------------------------------
# Working level <-> full resolution


def work_shape_for(full_hw: tuple[int, int], scale: tuple[int, int] | float) -> tuple[int, int]:
    """The working level's (h, w): `scale` is a target size (h, w) or a factor full/work."""
    if isinstance(scale, tuple):
        if len(scale) != 2 or min(scale) < 1:
            raise ConfigError(f"target size must be two positive ints, got {scale=}")
        return (int(scale[0]), int(scale[1]))
    if not scale > 0:
        raise ConfigError(f"scale factor must be positive, got {scale=}")
    # floor(x + 0.5) rather than round(): Python's round-half-to-even is surprising here.
    return tuple(max(1, math.floor(n / scale + 0.5)) for n in full_hw)  # type: ignore[return-value]


def full_res_chunk(tile: int, scale_yx: tuple[float, float]) -> int:
    """The full-resolution mask's (square) chunk size, at most MAX_FULL_CHUNK.

    tile*scale when that is an integer on both axes (the smaller one if they differ) and at
    most MAX_FULL_CHUNK, so full-res chunks line up with tiles; when it is larger, its
    largest divisor in [DEFAULT_FULL_CHUNK, MAX_FULL_CHUNK] (chunks still line up with
    tiles, several per tile); else DEFAULT_FULL_CHUNK. Any size is correct because
    full_res_owned assigns chunks of any size.
    """
    sizes = [tile * s for s in scale_yx]
    if all(s >= 1 and abs(s - round(s)) < 1e-9 for s in sizes):
        side = int(round(min(sizes)))
        if side <= MAX_FULL_CHUNK:
            return side
        for parts in range(2, side // DEFAULT_FULL_CHUNK + 1):
            if side % parts == 0 and side // parts <= MAX_FULL_CHUNK:
                return side // parts
    return min(DEFAULT_FULL_CHUNK, MAX_FULL_CHUNK)


def full_res_owned(
    tile: Tile, work_hw: tuple[int, int], full_hw: tuple[int, int], full_chunk: int
) -> Box:
    """The full-resolution region (whole chunks) the tile owns; may be empty.

    Full-res chunk j (rows [j*C, (j+1)*C)) belongs to the tile whose work region holds
    floor(j*C*Hw/Hf), the chunk's first row at the working level. The map is monotone, so
    each tile owns a contiguous run of chunks and each chunk has exactly one owner.
    """
    r = tile.region
    y0, y1 = _owned_axis(r.y0, r.y1, work_hw[0], full_hw[0], full_chunk)
    x0, x1 = _owned_axis(r.x0, r.x1, work_hw[1], full_hw[1], full_chunk)
    if y1 == y0 or x1 == x0:
        return Box(y0, x0, y0, x0)
    return Box(y0, x0, y1, x1)


def _owned_axis(a: int, b: int, work: int, full: int, chunk: int) -> tuple[int, int]:
    # floor(j*C*work/full) >= a  <=>  j >= ceil(a*full / (C*work)); same for < b. Integer
    # arithmetic, so the split is exact for any ratio.
    j0 = -(-a * full // (chunk * work))
    j1 = -(-b * full // (chunk * work))
    return (min(j0 * chunk, full), min(j1 * chunk, full))


def full_res_pieces(box: Box, chunk: int) -> list[Box]:
    """`box` (whole full-resolution chunks, as full_res_owned gives) cut into pieces of
    whole chunks, each at most max(chunk, MAX_FULL_CHUNK) a side, row-major: what a tile
    upsamples, labels and writes at a time, so its memory is bounded by the piece, not
    by the box it owns (which grows with the model's scale)."""
    if box.is_empty:
        return []
    step = max(1, MAX_FULL_CHUNK // chunk) * chunk
    return [
        Box(y, x, min(y + step, box.y1), min(x + step, box.x1))
        for y in range(box.y0, box.y1, step)
        for x in range(box.x0, box.x1, step)
    ]


def work_box_for_full(
    box_full: Box, work_hw: tuple[int, int], full_hw: tuple[int, int], margin: int = 1
) -> Box:
    """The working-level region that bilinear upsampling of `box_full` reads.

    align_corners=False: work = (full + 0.5) * Hw/Hf - 0.5; each output pixel reads
    floor(work) and the next row/column. `margin` more on each side absorbs floating-point
    rounding of the mapping. Clipped to the working level.
    """
    if box_full.is_empty:
        return Box(0, 0, 0, 0)
    y0, y1 = _work_axis(box_full.y0, box_full.y1, work_hw[0], full_hw[0], margin)
    x0, x1 = _work_axis(box_full.x0, box_full.x1, work_hw[1], full_hw[1], margin)
    return Box(y0, x0, y1, x1)


def _work_axis(f0: int, f1: int, work: int, full: int, margin: int) -> tuple[int, int]:
    ratio = work / full
    lo = math.floor((f0 + 0.5) * ratio - 0.5)
    hi = math.floor((f1 - 1 + 0.5) * ratio - 0.5) + 1
    return (max(0, lo - margin), min(work, hi + 1 + margin))
