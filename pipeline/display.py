"""How segpipe shows pixels: the one class palette, the one grey conversion and the one
display window. Every picture made for a person uses these (the store's NGFF label colours
and thumbnail, the stored preview, the overlay export), so a class has one colour
everywhere. Torch-free, numpy only.

Decisions, and why:
- ``PALETTE``: the first eight of Sasha Trubetskoy's "20 distinct colours", in his order
  (red, green, yellow, blue, ...), which was already what the stores' NGFF ``image-label``
  metadata holds: stores written before keep their colours.
- ``GREY_WEIGHTS``: ITU-R BT.601 luma (0.299, 0.587, 0.114), the weights with which
  ``pipeline.io.to_channels`` turns an RGB input into the grey a one-channel model sees
  (and PIL's ``convert("L")``): the thumbnail then shows what the model was given.
- ``WINDOW_PERCENTILES``: (0.5, 99.5). Deeper-than-8-bit inputs (DICOM modality values,
  16-bit PNG/TIFF) are stretched between these percentiles, so a few extreme pixels
  (burned-in markers, collimator edges, dead pixels) do not flatten the contrast, while
  fewer pixels are clipped than with 1-99 %. The stored previews already used this pair.
"""

from __future__ import annotations

import numpy as np

RGB = tuple[int, int, int]

# Class colours (RGB) for labels 1, 2, ...; a label past the end wraps round. Background
# (label 0) has no colour: it is left untinted in overlays and transparent in NGFF.
PALETTE: tuple[RGB, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
)  # fmt: skip

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma of R, G, B
WINDOW_PERCENTILES = (0.5, 99.5)


def class_colour(label: int) -> RGB:
    """The RGB colour of class ``label`` (1, 2, ...)."""
    if label < 1:
        raise ValueError(f"class labels start at 1 (0 is background), got {label=}")
    return PALETTE[(label - 1) % len(PALETTE)]


def class_colours(labels: np.ndarray) -> np.ndarray:
    """(..., 3) uint8: each pixel's class colour; background (0) pixels are black."""
    table = np.array([(0, 0, 0), *PALETTE], dtype=np.uint8)
    labels = np.asarray(labels).astype(np.int64)
    index = np.where(labels > 0, (labels - 1) % len(PALETTE) + 1, 0)
    return table[index]


def to_grey(image: np.ndarray) -> np.ndarray:
    """(h, w) from (h, w), (h, w, 1) or (h, w, 3|4) (alpha dropped) by GREY_WEIGHTS, in
    the image's dtype (integers rounded). Other shapes raise ValueError naming the shape."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        grey = image[..., :3].astype(np.float32) @ np.array(GREY_WEIGHTS, np.float32)
        return cast_like(grey, image.dtype)
    raise ValueError(f"expected an (h, w) or (h, w, 1|3|4) image, got shape {image.shape}")


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(h, w, 3) from (h, w) or (h, w, 1) (grey repeated) or (h, w, 3|4) (alpha dropped)."""
    pixels = image[..., None] if image.ndim == 2 else image
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (h, w) or (h, w, 1|3|4) image, got shape {image.shape}")
    return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]


Window = tuple[float, float] | None  # (low, high) stretched to 0..255; None: kept as is


def window_uint8(image: np.ndarray) -> np.ndarray:
    """A viewing copy in uint8, same shape: values already within 0..255 as they are
    (rounded), others stretched between their WINDOW_PERCENTILES (over all channels)."""
    return apply_window(image, display_window(image))


def display_window(image: np.ndarray) -> Window:
    """The window ``window_uint8`` applies to ``image``: None when its values are within
    0..255, else its WINDOW_PERCENTILES. Measured on a preview, it windows the full image
    chunk by chunk (``apply_window``) the same way everywhere."""
    if image.max(initial=0) <= 255 and image.min(initial=0) >= 0:
        return None
    low, high = np.percentile(image, WINDOW_PERCENTILES)
    return float(low), float(high)


def apply_window(image: np.ndarray, window: Window) -> np.ndarray:
    """``image`` in uint8 through ``window`` (None: rounded and clipped to 0..255)."""
    if window is None and image.dtype == np.uint8:
        return image
    if window is None and np.issubdtype(image.dtype, np.integer):
        # not rint: numpy rounds integers through float16, 25x slower on a 5000² RGB chunk set
        return np.clip(image, 0, 255).astype(np.uint8)
    if window is None:
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)
    low, high = window
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    return np.rint(scaled).astype(np.uint8)


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in ``dtype``: integers rounded and clipped to the dtype's range."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
