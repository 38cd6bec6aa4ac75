"""PNG and JPEG X-rays: 8 or 16 bit, grey, RGB or RGBA, channels exposed as stored.

Pillow reads the header (size, mode) without decoding. PNGs are decoded by imagecodecs,
because Pillow drops 16-bit RGB PNGs to 8 bits; JPEGs by Pillow, because libjpeg-turbo in
imagecodecs fills a truncated JPEG with grey instead of failing (limit: 8-bit JPEG only).
The image is decoded once, on the first read, and kept.
"""

from __future__ import annotations

import threading
from pathlib import Path

import imagecodecs
import numpy as np
from PIL.JpegImagePlugin import JpegImageFile
from PIL.PngImagePlugin import PngImageFile

from pipeline.errors import InputError
from pipeline.io.image import Image, Kind, Limits

_HEADER_PARSERS = {"png": PngImageFile, "jpeg": JpegImageFile}

# Pillow mode -> (channels, dtype) of the decoded array. Palette PNGs decode to RGB(A).
_MODES: dict[str, tuple[int, np.dtype]] = {
    "1": (1, np.dtype(np.uint8)),
    "L": (1, np.dtype(np.uint8)),
    "LA": (2, np.dtype(np.uint8)),
    "I;16": (1, np.dtype(np.uint16)),
    "I;16B": (1, np.dtype(np.uint16)),
    "RGB": (3, np.dtype(np.uint8)),
    "RGBA": (4, np.dtype(np.uint8)),
    "P": (3, np.dtype(np.uint8)),
}


class RasterImage(Image):
    """One PNG or JPEG image, a single level."""

    kind: Kind = "xray"

    def __init__(self, path: Path, fmt: str, limits: Limits) -> None:
        self._fmt = fmt
        height, width, channels, dtype = _header(path, fmt)
        super().__init__(path, [(height, width, channels)], None, dtype, limits)
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def format_name(self) -> str:
        return self._fmt

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._decoded()[y : y + h, x : x + w].copy()  # the cache must not be mutated

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                self._pixels = self._decode()
            return self._pixels

    def _decode(self) -> np.ndarray:
        if self._fmt == "png":
            pixels = imagecodecs.png_decode(self.path.read_bytes())
        else:
            with JpegImageFile(self.path) as pil:
                pixels = np.asarray(pil)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.shape != self.levels[0]:
            raise InputError(
                f"{self.path}: decoded shape {pixels.shape} differs from header {self.levels[0]}"
            )
        # 1-bit PNGs decode to 0/1; keep them as stored (masks), the dtype says uint8
        return pixels.astype(self.dtype, copy=False)


def _header(path: Path, fmt: str) -> tuple[int, int, int, np.dtype]:
    """Size, channels and dtype from the header, before anything is decoded."""
    try:
        # The plugin class parses only the header; PIL.Image.open would also apply Pillow's
        # global bomb limit, which Image._check_levels replaces with max_pixels.
        with _HEADER_PARSERS[fmt](path) as pil:
            mode = pil.mode
            width, height = pil.size
            transparent = "transparency" in pil.info
    except Exception as exc:  # Pillow raises OSError/SyntaxError/ValueError on bad headers
        raise InputError(f"{path}: unreadable {fmt.upper()} header: {exc}") from exc
    if mode not in _MODES:
        raise InputError(f"{path}: unsupported {fmt.upper()} mode {mode!r}")
    channels, dtype = _MODES[mode]
    if mode == "P" and transparent:
        channels = 4
    if fmt == "png" and _png_bit_depth(path) == 16:
        dtype = np.dtype(np.uint16)  # Pillow calls 16-bit RGB(A) PNGs "RGB"/"RGBA"
    return height, width, channels, dtype


def _png_bit_depth(path: Path) -> int:
    """Bit depth from IHDR, which PNG requires first: at byte 24 after the signature,
    chunk length, chunk type, width and height."""
    with path.open("rb") as handle:
        handle.seek(24)
        return handle.read(1)[0]
