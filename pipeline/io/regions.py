"""A label mask's regions, each whole however many tiles it spans, streamed from a mask
read one tile at a time (``mask_regions``); the geometry of one tile is polygons.py's.

Order of work: the mask is read in rows of ``side``^2 tiles. A region wholly inside a tile
is yielded when its tile is read. The pieces of one that reaches a neighbouring tile wait
until their row is read; then each label's pieces, with the regions carried down from the
row above, are merged (a union: the pieces of one region share border segments exactly),
and each merged region is yielded unless it reaches the next row, to which it is carried.

Memory: one tile, plus the outlines of the pieces waiting for their row and of the regions
still open (reaching the row not yet read), and the holes that reach that row. A hole
that can no longer change (every hole of a piece: it is enclosed inside its tile; a hole
closed by a merge, once it ends above the next row) is written to a temporary file
(``RingSpool``) and read back when its region is written out: a tissue region around a
hundred thousand nuclei holds their outlines on disk, not in memory, and its pieces merge
as outlines only. A region spanning the whole slide keeps its outline (as vertices, not
pixels) to the end.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import Polygon

from pipeline.io.polygons import merge_pieces, reaches_neighbour, tile_polygons

RingRef = tuple[int, int]  # (offset, vertex count) of a ring in a RingSpool


class RingSpool:
    """Rings (arrays of x, y vertices) parked in an anonymous temporary file (gone when
    closed or when the process ends) until their region is written. Vertices are stored
    as int32 (8 bytes each; pixel coordinates stay below 2^31); the file only grows, to
    the size of the parked holes' coordinates (a 105 MB GeoJSON export parked 26 MB)."""

    def __init__(self) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="segpipe-rings-")

    def put(self, ring: np.ndarray) -> RingRef:
        self._file.seek(0, 2)
        offset = self._file.tell()
        self._file.write(np.ascontiguousarray(ring, dtype=np.int32).tobytes())
        return offset, len(ring)

    def get(self, ref: RingRef) -> np.ndarray:
        offset, count = ref
        self._file.seek(offset)
        return np.frombuffer(self._file.read(count * 8), dtype=np.int32).reshape(count, 2)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class Region:
    """One whole region of one label: its polygon (outline and the holes held in memory)
    and the holes parked in the spool. Read it before the next region is asked for."""

    label: int
    polygon: Polygon
    parked: tuple[RingRef, ...] = ()
    spool: RingSpool | None = None

    def rings(self) -> Iterator[np.ndarray]:
        """(n, 2) x, y vertices of the outline, then of every hole, one at a time (a ring
        closes on its first vertex)."""
        yield shapely.get_coordinates(self.polygon.exterior)
        for hole in self.polygon.interiors:
            yield shapely.get_coordinates(hole)
        for ref in self.parked:
            yield self.spool.get(ref)  # type: ignore[union-attr]

    def whole(self) -> Polygon:
        """The region's full polygon, parked holes included (all of it in memory)."""
        outline, *holes = self.rings()
        return Polygon(outline, holes)


def mask_regions(mask: Any, side: int) -> Iterator[Region]:
    """Every 4-connected region of every label > 0 of the (H, W) label array ``mask``
    (array-like: zarr, numpy), each once and whole, reading ``side``^2 tiles in rows."""
    height, width = mask.shape
    spool = RingSpool()
    try:
        carried: dict[int, list[Region]] = {}
        for y in range(0, height, side):
            bottom = min(y + side, height)
            waiting, carried = carried, {}
            for x in range(0, width, side):
                box = (y, x, bottom, min(x + side, width))
                tile = np.asarray(mask[y:bottom, x : box[3]])
                for label, polygon in tile_polygons(tile, (y, x)):
                    if not reaches_neighbour(polygon.bounds, box, (height, width)):
                        yield Region(label, polygon)
                        continue
                    # a piece's holes are enclosed inside its tile: final, all of them
                    piece = park_holes(Region(label, polygon, spool=spool), above_row=math.inf)
                    waiting.setdefault(label, []).append(piece)
            for label, regions in waiting.items():
                for region in merge_regions(regions, spool):
                    if bottom < height and region.polygon.bounds[3] == bottom:
                        # holes closed by the merge that end above the next row are final
                        carried.setdefault(label, []).append(park_holes(region, above_row=bottom))
                    else:
                        yield region
    finally:
        spool.close()


def merge_regions(regions: list[Region], spool: RingSpool) -> list[Region]:
    """The regions that ``regions`` (pieces and carried regions of one label) make when
    merged, each with the parked holes of the regions it took in."""
    parts = merge_pieces([r.polygon for r in regions])
    parked: list[list[RingRef]] = [[] for _ in parts]
    tree = shapely.STRtree(parts)
    for region in regions:
        if region.parked:
            # a point inside a merged-in region lies inside the one part that holds it
            [index] = tree.query(region.polygon.point_on_surface(), predicate="within")
            parked[index] += region.parked
    label = regions[0].label
    return [Region(label, part, tuple(refs), spool) for part, refs in zip(parts, parked, strict=True)]


def park_holes(region: Region, above_row: float) -> Region:
    """``region`` with its holes that end above row ``above_row`` (final: every pixel
    round them is read) moved to the spool. The outline then covers their area, which no
    later piece can reach."""
    parked = [hole for hole in region.polygon.interiors if hole.bounds[3] < above_row]
    if not parked:
        return region
    spool = region.spool
    assert spool is not None, "a region that can park holes carries the spool"
    refs = tuple(spool.put(shapely.get_coordinates(hole)) for hole in parked)
    kept = [hole for hole in region.polygon.interiors if hole.bounds[3] >= above_row]
    polygon = Polygon(region.polygon.exterior, kept)
    return Region(region.label, polygon, region.parked + refs, spool)
