"""The store's picture of its input: a grey NGFF image pyramid at the group's root, so
viewers show the image under its mask (NGFF wants a label image to share its parent
image's axes, and the mask is (y, x))."""

from __future__ import annotations

import numpy as np
import zarr
from skimage.transform import pyramid_reduce

from pipeline.display import cast_like, to_grey
from pipeline.store.errors import StoreError
from pipeline.store.layout import COMPRESSORS, StoreLayout
from pipeline.store.ngff import NGFF_VERSION, ngff_multiscales

THUMBNAIL_MAX_SIDE = 4096  # write_thumbnail holds the thumbnail in memory
THUMBNAIL_MIN_SIDE = 256


def write_thumbnail(group: zarr.Group, image: np.ndarray, layout: StoreLayout, where: str) -> None:
    """Write ``image`` (the whole input downsampled to a long side <= THUMBNAIL_MAX_SIDE,
    (h, w) or (h, w, 3|4); RGB becomes grey) as arrays 0, 1, ... of ``group`` with their
    NGFF multiscales; levels left from a larger thumbnail are removed."""
    try:
        grey = to_grey(image)
    except ValueError as exc:
        raise StoreError(f"{where}: thumbnail: {exc}") from exc
    if max(grey.shape) > THUMBNAIL_MAX_SIDE:
        raise StoreError(f"{where}: thumbnail {grey.shape} > {THUMBNAIL_MAX_SIDE}")
    levels = [grey]
    while max(levels[-1].shape) > THUMBNAIL_MIN_SIDE:
        levels.append(_reduce2(levels[-1]))
    for k, level in enumerate(levels):
        arr = group.create_array(
            str(k), shape=level.shape, dtype=level.dtype, chunks=(512, 512),
            compressors=COMPRESSORS, dimension_names=("y", "x"), overwrite=True,
        )  # fmt: skip
        arr[...] = level
    stale = [n for n in group.array_keys() if n.isdigit() and int(n) >= len(levels)]
    for name in stale:
        del group[name]
    full_h, full_w = layout.full_hw
    scales = [(full_h / lv.shape[0], full_w / lv.shape[1]) for lv in levels]
    multiscales = ngff_multiscales(layout.image_id, layout.mpp, scales)
    group.attrs.update({"ome": {"version": NGFF_VERSION, "multiscales": multiscales}})


def _reduce2(level: np.ndarray) -> np.ndarray:
    """Half size with a gaussian pre-filter: a picture, unlike labels, is averaged."""
    reduced = pyramid_reduce(level, downscale=2, preserve_range=True, channel_axis=None)
    return cast_like(reduced, level.dtype)
