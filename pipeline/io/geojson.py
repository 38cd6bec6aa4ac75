"""The mask's regions as GeoJSON that QuPath imports as objects (File > Import objects, or
dragging the file onto the image), one feature per region, whole across tiles.

The file is a FeatureCollection in QuPath's form (as QuPath's own "Export objects as
GeoJSON" writes it, and TIAToolbox and HistomicsTK read):

    {"type": "Feature",
     "geometry": {"type": "Polygon", "coordinates": [outline, hole, ...]},
     "properties": {"objectType": "annotation" | "detection",
                    "classification": {"name": <class name>, "color": [r, g, b]}}}

- Coordinates are full-resolution pixels, (x, y), on pixel edges: pixel (r, c) is the
  square [c, c + 1] x [r, r + 1], QuPath's pixel convention; integers, so no precision is
  spent. Regions are 4-connected (``pipeline.io.polygons``), so each is one Polygon with
  its holes; rings follow RFC 7946 (outline counter-clockwise, holes clockwise, in x/y).
- ``objectType``: QuPath keeps "annotation"s for editable regions (few, large) and
  "detection"s for many small objects (its cell detection makes detections). A region is
  a detection when the pixel size is known and its area is at most DETECTION_MAX_UM2 (a
  nucleus), else an annotation (tissue, tumour, lungs; everything when µm/px is unknown).
- Colours are ``pipeline.display.class_colour``, as in every other view of the mask.
- Streamed: features are written as regions are completed (``regions.mask_regions``), so
  memory holds one tile and the regions still open, never the slide's polygons.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline.display import class_colour
from pipeline.errors import ConfigError
from pipeline.io.export_files import writing
from pipeline.io.polygons import signed_area
from pipeline.io.regions import Region, mask_regions

# QuPath's cell detection keeps nuclei up to 400 µm^2 by default (its "Maximum area"):
# a region no larger is nucleus-sized and imported as a detection.
DETECTION_MAX_UM2 = 400.0
READ_SIDE = 2048  # the tile read at once (about 4 MB of labels, 16 MB labelled)


def export_geojson(
    mask: Any, classes: Sequence[str], path: str | Path, mpp: float | None, instances: bool = False
) -> dict[str, int]:
    """Write every region of the (H, W) uint8 label array ``mask`` (full resolution,
    array-like, e.g. zarr) as a GeoJSON feature, label k being ``classes[k - 1]``; returns
    the number of features per class name. ``instances``: ``mask`` is an instance image
    (labels/nuclei, uint32 ids): each instance is a feature of the first class, so touching
    nuclei stay separate objects."""
    counts = dict.fromkeys(classes, 0)
    with writing(path) as local, open(local, "w", encoding="utf-8") as out:
        out.write('{"type":"FeatureCollection","features":[')
        for n, region in enumerate(mask_regions(mask, read_side(mask))):
            label = 1 if instances else region.label
            name = _class_name(classes, label, path)
            out.write(("," if n else "") + "\n")
            write_feature(out, region, name, mpp, label)
            counts[name] += 1
        out.write("\n]}\n")
    return counts


def write_feature(out: IO[str], region: Region, name: str, mpp: float | None, label: int | None = None) -> None:
    """One QuPath feature: the region's rings, one at a time (a region may have more holes
    than memory should hold at once), with integer coordinates in RFC 7946 order; then its
    class and object type, which needs the area the rings add up to."""
    out.write('{"type":"Feature","geometry":{"type":"Polygon","coordinates":[')
    area = 0.0
    for index, ring in enumerate(region.rings()):
        ring_area = signed_area(ring)
        if (ring_area > 0) == (index > 0):  # outline counter-clockwise, holes clockwise
            ring = ring[::-1]
        area += abs(ring_area) if index == 0 else -abs(ring_area)
        out.write(("," if index else "") + _compact(ring.astype(np.int64).tolist()))
    properties = {
        "objectType": object_type(area, mpp),
        "classification": {"name": name, "color": list(class_colour(label or region.label))},
    }
    out.write(']},"properties":' + _compact(properties) + "}")


def object_type(area: float, mpp: float | None) -> str:
    """QuPath's object type for a region of ``area`` pixels: "detection" when
    nucleus-sized (known µm/px), else "annotation"."""
    if mpp is not None and area * mpp * mpp <= DETECTION_MAX_UM2:
        return "detection"
    return "annotation"


def read_side(mask: Any) -> int:
    """The side of the tiles read: whole chunks (a zarr array decodes each chunk once),
    about READ_SIDE; READ_SIDE for arrays without chunks."""
    chunks = getattr(mask, "chunks", None)
    if not chunks:
        return READ_SIDE
    chunk = int(chunks[0])
    return chunk * max(1, READ_SIDE // chunk) if chunks[0] == chunks[1] else READ_SIDE


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # json.dumps: C-encoded; json.dump is not


def _class_name(classes: Sequence[str], label: int, path: str | Path) -> str:
    if label > len(classes):
        raise ConfigError(f"{path}: mask label {label} but only {len(classes)} class names")
    return classes[label - 1]
