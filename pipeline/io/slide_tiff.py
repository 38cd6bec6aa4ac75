"""The mask as a plain tiled pyramidal TIFF with a colour map: the form OpenSlide's
generic-tiff driver reads with all its levels (and so ASAP, QuPath's OpenSlide server and
most whole-slide viewers built on OpenSlide), while tifffile reads it as one series with
its levels.

Why a file of its own beside the OME-TIFF export: OME-TIFF keeps a pyramid's reduced
levels in level 0's SubIFDs, which OpenSlide does not read (it saw one level, and a 1024-px
thumbnail of a 20k^2 mask decoded all of it). OpenSlide wants each level as a top-level
IFD, reduced ones marked NewSubfileType=1; an OME-TIFF written that way is, to OME
readers, one separate image per level, not a pyramid (tried: tifffile reads four 1-level
OME series). One file cannot be both, so ``ome-tiff`` stays for OME tools and this is
``tiff``.

- Pixels are the labels (0 = background, 1..C = classes), photometric palette: label k
  shows in ``pipeline.display.class_colour(k)``, background black (TIFF palettes have no
  alpha). A reader that ignores the palette still gets the labels.
- The first IFD's ImageDescription is JSON naming each label and its colour (OpenSlide
  shows it as ``openslide.comment``); it has no "shape" key, so tifffile does not take it
  for its own shaped-series metadata.
- Resolution tags carry µm per pixel per level (OpenSlide's ``openslide.mpp-x``).
- Written tile by tile from the mask levels (memory: one tile).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from pipeline.display import class_colour
from pipeline.io.export_files import EXPORT_TILE, tiles, writing

DESCRIPTION_KIND = "segpipe label mask"


def export_slide_tiff(
    mask_levels: Sequence[Any], classes: Sequence[str], path: str | Path, mpp: float | None
) -> str:
    """Write a pyramid of (H, W) uint8 labels (level 0 first, each array-like and
    sliceable, e.g. zarr) as a tiled, zlib-compressed, palette-coloured pyramidal TIFF with
    every level a top-level IFD; label k is ``classes[k - 1]``."""
    colormap = palette_colormap()
    description = label_description(classes)
    width0 = mask_levels[0].shape[1]
    # tifffile seeks back to patch offsets: it writes a local file, uploaded after
    with writing(path) as local, tifffile.TiffWriter(local, bigtiff=True) as tif:
        for index, level in enumerate(mask_levels):
            options: dict[str, Any] = {
                "tile": (EXPORT_TILE, EXPORT_TILE),
                "compression": "zlib",
                "photometric": "palette",
                "colormap": colormap,  # in every IFD: OpenSlide decodes each level alone
                "metadata": None,  # no tifffile shaped-series JSON: ours is the description
            }
            if index == 0:
                options["description"] = description
            else:
                options["subfiletype"] = 1  # reduced-resolution image (TIFF 6 NewSubfileType)
            if mpp is not None:
                level_mpp = mpp * width0 / level.shape[1]
                options.update(resolution=(1e4 / level_mpp,) * 2, resolutionunit="CENTIMETER")
            tif.write(tiles(level), shape=level.shape, dtype=np.uint8, **options)
    return str(path)


def palette_colormap() -> np.ndarray:
    """(3, 256) uint16 TIFF ColorMap: label 0 black, label k its class colour. TIFF colour
    maps are 16-bit; 8-bit colours are scaled by 257 so 255 maps to 65535 exactly."""
    colours = np.array([(0, 0, 0)] + [class_colour(k) for k in range(1, 256)], np.uint16)
    return np.ascontiguousarray(colours.T * 257)


def label_description(classes: Sequence[str]) -> str:
    """The ImageDescription JSON: each label's value, class name and RGB colour."""
    labels = [{"value": 0, "name": "background", "color": [0, 0, 0]}]
    labels += [
        {"value": k, "name": name, "color": list(class_colour(k))}
        for k, name in enumerate(classes, start=1)
    ]
    return json.dumps({"kind": DESCRIPTION_KIND, "labels": labels})
