"""The one image interface every reader implements, and the helpers that only need it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from pipeline.config import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SLIDE_PIXELS
from pipeline.display import to_grey
from pipeline.errors import InputError

Kind = Literal["xray", "slide"]
Shape = tuple[int, int, int]  # (H, W, C) of one level

ALLOWED_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA; anything else is refused at open


@dataclass(frozen=True)
class Limits:
    """Size guards checked from headers, before any pixel is decoded.

    ``max_pixels`` bounds whatever one decode produces: a whole X-ray, or one tile or region
    of a slide. ``max_slide_pixels`` bounds level 0 of tile-addressable slides, which are never
    decoded whole.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_slide_pixels: int = DEFAULT_MAX_SLIDE_PIXELS


class Image(ABC):
    """An opened input image: its levels, pixel size and region reads.

    ``levels`` lists (H, W, C) per level, level 0 at full resolution; ``mpp`` is micrometres
    per pixel at level 0 (None when the file does not say); ``read_region`` returns
    (h, w, C) arrays of ``dtype``.
    """

    kind: Kind

    def __init__(
        self,
        path: Path,
        levels: list[Shape],
        mpp: float | None,
        dtype: np.dtype,
        limits: Limits,
    ) -> None:
        self.path = path
        self.levels = levels
        self.mpp = mpp
        self.dtype = np.dtype(dtype)
        self.limits = limits
        self._check_levels()

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of ``level`` in rows y..y+h, columns x..x+w, as (h, w, C).

        The region must lie inside the level: reads are strict so that a tiling bug shows
        up as an error rather than as padding.
        """
        self._check_region(level, y, x, h, w)
        try:
            region = self._read(level, y, x, h, w)
        except InputError:
            raise
        except Exception as exc:  # untrusted bytes: any codec failure is the file's fault
            raise InputError(
                f"{self.path}: cannot decode level {level} region "
                f"y={y} x={x} h={h} w={w}: {one_line(exc)}"
            ) from exc
        return region

    def lazy_level(self, level: int) -> Any | None:
        """A lazy dask array (H, W, C) of ``level`` read in place, or None if the format
        is not tile-addressable (it is then decoded whole and must be ingested)."""
        return None

    def metadata_safe(self) -> dict[str, Any]:
        """Facts about the image without any patient identifier, fit for provenance."""
        return {
            "format": self.format_name,
            "kind": self.kind,
            "levels": [list(shape) for shape in self.levels],
            "mpp": self.mpp,
            "dtype": self.dtype.name,
        }

    @property
    @abstractmethod
    def format_name(self) -> str:
        """Short name of the container format, e.g. 'dicom', 'png', 'svs'."""

    @abstractmethod
    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Decode a region already checked to lie inside the level."""

    def close(self) -> None:  # noqa: B027 (optional hook: readers without handles skip it)
        """Release file handles; the default reader holds none."""

    def __enter__(self) -> Image:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} {self.kind} levels={self.levels}>"

    def _check_levels(self) -> None:
        if not self.levels:
            raise InputError(f"{self.path}: no image levels found")
        channels = self.levels[0][2]
        if channels not in ALLOWED_CHANNELS:
            raise InputError(
                f"{self.path}: {channels} channels, expected one of {ALLOWED_CHANNELS}"
            )
        height, width, _ = self.levels[0]
        if self.kind == "xray" and height * width > self.limits.max_pixels:
            raise InputError(
                f"{self.path}: {height}x{width} = {height * width} pixels exceeds "
                f"max_pixels={self.limits.max_pixels}"
            )
        if self.kind == "slide" and height * width > self.limits.max_slide_pixels:
            raise InputError(
                f"{self.path}: level 0 {height}x{width} = {height * width} pixels exceeds "
                f"max_slide_pixels={self.limits.max_slide_pixels}"
            )

    def _check_region(self, level: int, y: int, x: int, h: int, w: int) -> None:
        if not 0 <= level < len(self.levels):
            raise InputError(f"{self.path}: level {level} not in 0..{len(self.levels) - 1}")
        height, width, _ = self.levels[level]
        if h <= 0 or w <= 0 or y < 0 or x < 0 or y + h > height or x + w > width:
            raise InputError(
                f"{self.path}: region y={y} x={x} h={h} w={w} outside level {level} "
                f"of {height}x{width}"
            )
        if h * w > self.limits.max_pixels:
            raise InputError(
                f"{self.path}: region {h}x{w} exceeds max_pixels={self.limits.max_pixels}"
            )


def one_line(exc: BaseException) -> str:
    """A library exception as '<Type>: message' on one line (errors are one line each)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def check_chunk_size(path: Path, chunk_shape: tuple[int, int], limits: Limits) -> None:
    """Refuse a tile-addressable source whose single stored chunk (a tile, a strip) would be
    a decompression bomb: codecs decode a chunk whole even for a small region."""
    if math.prod(chunk_shape) > limits.max_pixels:
        raise InputError(
            f"{path}: one stored chunk {chunk_shape} exceeds max_pixels={limits.max_pixels}"
        )


def level_mpp(image: Image, level: int) -> float | None:
    """Micrometres per pixel of ``level``, derived from level 0 and the width ratio."""
    if image.mpp is None:
        return None
    return image.mpp * image.levels[0][1] / image.levels[level][1]


def select_level(image: Image, target_mpp: float | None) -> tuple[int, float]:
    """The coarsest level at least as fine as ``target_mpp``, and the factor still needed.

    The factor is target_mpp / level_mpp: >= 1 means downsample by it, < 1 means even
    level 0 is coarser than the target (upsample). ``target_mpp`` None selects level 0, 1.0.
    """
    if target_mpp is None:
        return 0, 1.0
    if target_mpp <= 0:
        raise InputError(f"{image.path}: target_mpp must be > 0, got {target_mpp}")
    if image.mpp is None:
        raise InputError(
            f"{image.path}: no pixel size (mpp) in the file; cannot select a level "
            f"for target_mpp={target_mpp}"
        )
    best = 0
    for level in range(len(image.levels)):
        mpp = level_mpp(image, level)
        # relative tolerance: level sizes are rounded, so a 2x level is rarely exactly 2x
        if mpp is not None and mpp <= target_mpp * (1 + 1e-3):
            best = level
    mpp = level_mpp(image, best)
    assert mpp is not None
    return best, target_mpp / mpp


def to_channels(array: np.ndarray, n: int) -> np.ndarray:
    """Convert (H, W, C) to n channels: RGB->grey by luminance (ITU-R 601), grey->RGB by
    repetition, alpha dropped. The dtype is kept (luminance of integers is rounded)."""
    if array.ndim != 3:
        raise InputError(f"expected an (H, W, C) array, got shape {array.shape}")
    channels = array.shape[2]
    if channels not in ALLOWED_CHANNELS:
        raise InputError(f"cannot convert {channels} channels, expected one of {ALLOWED_CHANNELS}")
    if n not in (1, 3):
        raise InputError(f"can convert to 1 or 3 channels, not {n}")
    colour = array[..., :3] if channels == 4 else array
    if colour.shape[2] == n:
        return colour
    if n == 3:
        return np.repeat(colour, 3, axis=2)
    return to_grey(colour)[..., None]
