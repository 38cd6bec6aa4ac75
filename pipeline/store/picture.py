"""The store's picture of its input: an NGFF image pyramid at the group's root, in the
input's own colours, whose ``labels/`` are the masks. Level k of the picture has the shape,
path and scale of mask level k, from level ``picture_from`` on (layout.py says why).

The picture is made chunk by chunk from a lazy view of the input at the first level's shape
(``pipeline.io.picture_source``), so no code path holds it whole (invariant 3); coarser
levels are 2x2 means of the level above (pyramid.py). Colour inputs keep R, G, B (alpha is
dropped); grey ones keep one channel. Pixels deeper than 8 bits go through the display
window measured on the preview (pipeline.display), the one every picture of the image uses.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr

from pipeline.display import Window, apply_window
from pipeline.store.errors import StoreError
from pipeline.store.layout import COMPRESSORS, StoreLayout, level_chunks, level_scales
from pipeline.store.ngff import (
    GREY_CHANNEL,
    NGFF_VERSION,
    RGB_CHANNELS,
    ngff_multiscales,
    ngff_omero,
)
from pipeline.store.pyramid import IN_MEMORY_BYTES, build_level, halve_mean


def write_picture(group: zarr.Group, source: da.Array, window: Window, layout: StoreLayout,
                  where: str) -> None:  # fmt: skip
    """Write the picture from ``source``, (h, w, C) with C in 1, 3, 4 and (h, w) the shape
    of mask level ``layout.picture_from``; its NGFF metadata goes last, so a picture with
    metadata is whole."""
    first = layout.picture_from
    expected = layout.levels[first]
    if source.ndim != 3 or tuple(source.shape[:2]) != expected or source.shape[2] not in (1, 3, 4):
        raise StoreError(f"{where}: picture source {source.shape}, expected {expected} x 1|3|4 channels")
    colour = source.shape[2] >= 3
    pixels = source[..., :3] if colour else source
    shown = layout.shown_levels
    arrays = {k: _level_array(group, k, pixels.shape[2], layout.levels[k]) for k in shown}
    display = pixels.map_blocks(apply_window, window, dtype=np.uint8)
    above: np.ndarray | None = None
    if arrays[first].nbytes <= IN_MEMORY_BYTES:  # small: made at once, kept for level 2
        above = np.asarray(display.transpose(2, 0, 1).compute(scheduler="synchronous"))
        arrays[first][...] = above
    else:
        da.store(display.transpose(2, 0, 1).rechunk(arrays[first].chunks), arrays[first], lock=False)
    for k in shown[1:]:
        above = build_level(arrays[k - 1], arrays[k], halve_mean, above)
    channels = RGB_CHANNELS if colour else GREY_CHANNEL
    omero = ngff_omero(channels, (0.0, 255.0))
    if not colour:
        omero["rdefs"]["model"] = "greyscale"
    multiscales = ngff_multiscales(layout.image_id, layout.mpp, level_scales(shown),
                                   paths=[str(k) for k in shown], channel=True)  # fmt: skip
    group.attrs.update({"ome": {"version": NGFF_VERSION, "multiscales": multiscales, "omero": omero}})


def picture_written(group: zarr.Group) -> bool:
    """Whether the picture was written whole (its metadata is written last)."""
    return "multiscales" in (group.attrs.get("ome") or {})


def _level_array(group: zarr.Group, k: int, channels: int, shape: tuple[int, int]) -> zarr.Array:
    return group.create_array(
        str(k), shape=(channels, *shape), dtype=np.uint8, chunks=(channels, *level_chunks(shape)),
        fill_value=0, compressors=COMPRESSORS, dimension_names=("c", "y", "x"), overwrite=True,
    )  # fmt: skip
