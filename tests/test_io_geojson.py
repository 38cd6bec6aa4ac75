"""Regions as polygons (pipeline.io.polygons, pipeline.io.regions) and the `geojson`
export QuPath imports: geometry on tiny arrays, then a synthetic slide mask read back by
json and shapely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from scipy import ndimage
from shapely.geometry import Polygon, shape
from skimage.draw import disk, ellipse

from pipeline.display import class_colour
from pipeline.errors import ConfigError
from pipeline.io import geojson
from pipeline.io.geojson import DETECTION_MAX_UM2, export_geojson
from pipeline.io.polygons import pixel_polygon, signed_area
from pipeline.io.regions import mask_regions
from tests.io_fixtures import ReadRecorder

# ---------------------------------------------------------------------------------------
# geometry


def _covered(polygon: Polygon, shape_hw: tuple[int, int]) -> np.ndarray:
    """The flat indices of the pixels whose centres ``polygon`` contains: its pixels, read
    back independently of how it was built."""
    minx, miny, maxx, maxy = (int(v) for v in polygon.bounds)
    rows, cols = np.mgrid[max(miny, 0) : maxy, max(minx, 0) : maxx]
    inside = shapely.contains_xy(polygon, cols + 0.5, rows + 0.5)
    return np.ravel_multi_index((rows[inside], cols[inside]), shape_hw)


def test_pixel_polygon_follows_pixel_edges_in_x_y() -> None:
    pixels = np.array([[1, 0, 0], [1, 1, 1]], bool)  # an L, 2 rows x 3 columns
    polygon = pixel_polygon(pixels, origin=(10, 20))  # (y, x) of pixel (0, 0)
    assert polygon.area == 4 and polygon.bounds == (20, 10, 23, 12)  # (minx, miny, maxx, maxy)
    expected = Polygon([(20, 10), (21, 10), (21, 11), (23, 11), (23, 12), (20, 12)])
    assert polygon.equals(expected) and len(polygon.exterior.coords) == 7  # corners only


def test_ring_orientation_holds_far_out_on_a_slide() -> None:
    """Parked rings come back as int32: their area must not overflow (60000^2 > 2^31)."""
    ring = np.array([[0, 0], [60000, 0], [60000, 60000], [0, 60000]], np.int32)
    assert signed_area(ring) == 60000.0**2 and signed_area(ring[::-1]) == -(60000.0**2)


def test_a_ring_is_one_polygon_with_its_hole() -> None:
    mask = np.zeros((7, 7), np.uint8)
    mask[1:6, 1:6] = 1
    mask[3, 3] = 0
    [(label, polygon)] = [(r.label, r.whole()) for r in mask_regions(mask, side=4)]  # hole on a tile corner
    assert label == 1 and polygon.is_valid and len(polygon.interiors) == 1
    assert polygon.area == 24 and Polygon(polygon.interiors[0]).area == 1


def test_pixels_meeting_at_a_corner_are_two_regions() -> None:
    mask = np.array([[1, 0], [0, 1]], np.uint8)
    found = sorted(r.polygon.bounds for r in mask_regions(mask, side=1))
    assert found == [(0, 0, 1, 1), (1, 1, 2, 2)]


@pytest.mark.parametrize("seed", range(6))
def test_every_region_is_one_valid_polygon_of_exactly_its_pixels(seed: int) -> None:
    """Random labels cut by tiles of every size: each 4-connected region (scipy's labelling)
    comes back once, whole, valid, covering exactly its pixels."""
    rng = np.random.default_rng(seed)
    height, width = rng.integers(20, 50, 2)
    mask = (rng.random((height, width)) < 0.55) * rng.integers(1, 3, (height, width))
    mask = mask.astype(np.uint8)
    side = int(rng.integers(3, 17))
    found = [(r.label, r.whole()) for r in mask_regions(mask, side)]
    expected = []
    for label in (1, 2):
        regions, n = ndimage.label(mask == label)
        expected += [(label, regions == k) for k in range(1, n + 1)]
    assert len(found) == len(expected)
    by_pixels = {(label, np.flatnonzero(pixels).tobytes()) for label, pixels in expected}
    for label, polygon in found:
        assert polygon.is_valid and polygon.geom_type == "Polygon"
        pixels = _covered(polygon, mask.shape)
        assert (label, pixels.tobytes()) in by_pixels and polygon.area == pixels.size


def test_an_open_region_parks_its_closed_holes() -> None:
    """A region open across many rows of tiles keeps in memory only the holes that reach
    the row not yet read; the others wait in the spool and come back with the region."""
    mask = np.ones((200, 30), np.uint8)
    mask[2:198:4, 5] = mask[2:198:4, 20] = 0  # 98 one-pixel holes, down the whole height
    regions = mask_regions(mask, side=10)
    region = next(regions)  # read while the stream is open: its spool closes with it
    assert len(region.parked) >= 90 and len(region.polygon.interiors) < 8
    polygon = region.whole()
    assert next(regions, None) is None
    assert polygon.is_valid and len(polygon.interiors) == 98 and polygon.area == mask.sum()


# ---------------------------------------------------------------------------------------
# the export on a synthetic slide mask

CLASSES = ("tissue", "nucleus")
TILE = 128  # the tiles the export reads, made small so that regions cross them
MPP = 0.5


def _slide_mask() -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """A 700 x 900 mask and each known region's pixels (sorted flat indices): a tissue blob
    across four tiles, a tissue ring (with its hole) across a tile corner, and nuclei on a
    grid that puts some across tile borders, none touching the tissue."""
    mask = np.zeros((700, 900), np.uint8)
    regions: dict[str, list[np.ndarray]] = {"tissue": [], "nucleus": []}
    blob = np.zeros_like(mask, bool)
    blob[ellipse(200, 250, 150, 200, shape=mask.shape)] = True
    ring = np.zeros_like(mask, bool)
    ring[disk((512, 640), 60, shape=mask.shape)] = True
    ring[disk((512, 640), 25, shape=mask.shape)] = False
    for region in (blob, ring):
        mask[region] = 1
        regions["tissue"].append(np.flatnonzero(region))
    near_tissue = ndimage.binary_dilation(blob | ring, iterations=2)
    for y in range(20, 700, 36):  # every fourth row and column of nuclei is cut by a tile
        for x in range(476, 900, 36):
            nucleus = disk((y, x), 6, shape=mask.shape)
            if not near_tissue[nucleus].any():
                mask[nucleus] = 2
                regions["nucleus"].append(np.sort(np.ravel_multi_index(nucleus, mask.shape)))
    return mask, regions


def _tile_of(flat: np.ndarray, shape_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """The tile (row, column) of each pixel given by flat index."""
    rows, cols = np.unravel_index(flat, shape_hw)
    return list(zip((rows // TILE).tolist(), (cols // TILE).tolist(), strict=True))


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geojson, "READ_SIDE", TILE)


def _features(path: str | Path) -> list[dict]:
    document = json.loads(Path(path).read_text())
    assert document["type"] == "FeatureCollection"
    return document["features"]


def test_geojson_has_each_region_once_whole_with_its_class(tmp_path: Path, small_tiles: None) -> None:
    mask, regions = _slide_mask()
    stored = zarr.create_array(tmp_path / "mask.zarr", data=mask, chunks=(64, 64))
    counts = export_geojson(stored, CLASSES, tmp_path / "mask.geojson", mpp=MPP)
    features = _features(tmp_path / "mask.geojson")

    assert counts == {"tissue": 2, "nucleus": len(regions["nucleus"])}
    assert len(features) == 2 + len(regions["nucleus"])
    crossing = [r for r in regions["nucleus"] if len(set(_tile_of(r, mask.shape))) > 1]
    assert len(crossing) > 20  # the nuclei cut by tile borders came back whole, each once
    unmatched = {(name, r.tobytes()) for name, found in regions.items() for r in found}
    for item in features:
        assert item["type"] == "Feature" and item["geometry"]["type"] == "Polygon"
        polygon = shape(item["geometry"])
        assert polygon.is_valid
        name = item["properties"]["classification"]["name"]
        label = CLASSES.index(name) + 1
        assert item["properties"]["classification"]["color"] == list(class_colour(label))
        pixels = _covered(polygon, mask.shape)  # coordinates are (x, y): a swap fails here
        unmatched.remove((name, pixels.tobytes()))  # KeyError: a region cut or merged
        # outlines run on pixel edges, so areas are pixel counts exactly (no tolerance)
        assert polygon.area == pixels.size
        # RFC 7946 winding: outline counter-clockwise, holes clockwise (in x/y)
        assert polygon.exterior.is_ccw and not any(ring.is_ccw for ring in polygon.interiors)
        nucleus_sized = polygon.area * MPP**2 <= DETECTION_MAX_UM2
        assert item["properties"]["objectType"] == ("detection" if nucleus_sized else "annotation")
        assert nucleus_sized == (name == "nucleus")
    assert not unmatched

    tissue = [shape(f["geometry"]) for f in features if f["properties"]["classification"]["name"] == "tissue"]
    blob, ring = sorted(tissue, key=lambda p: p.bounds[1])
    tiles_spanned = set(_tile_of(regions["tissue"][0], mask.shape))
    assert len(tiles_spanned) >= 4 and not blob.interiors  # one feature across four tiles
    hole = np.zeros_like(mask, bool)
    hole[disk((512, 640), 25, shape=mask.shape)] = True
    assert len(ring.interiors) == 1 and Polygon(ring.interiors[0]).area == hole.sum()
    assert {(y // TILE, x // TILE) for x, y in ring.interiors[0].coords} == {(3, 4), (3, 5), (4, 4), (4, 5)}


def test_geojson_reads_the_mask_tile_by_tile(tmp_path: Path, small_tiles: None) -> None:
    mask, regions = _slide_mask()
    level = ReadRecorder(mask)
    export_geojson(level, CLASSES, tmp_path / "mask.geojson", mpp=MPP)
    assert len(level.reads) == 6 * 8 and max(level.reads) <= TILE * TILE  # each tile once
    assert len(_features(tmp_path / "mask.geojson")) == 2 + len(regions["nucleus"])


def test_geojson_without_pixel_size_has_annotations_only(tmp_path: Path) -> None:
    mask = np.zeros((40, 30), np.uint8)
    mask[5:9, 5:9] = 1
    export_geojson(mask, ("lung",), tmp_path / "mask.geojson", mpp=None)
    [item] = _features(tmp_path / "mask.geojson")
    assert item["properties"]["objectType"] == "annotation"
    [outline] = item["geometry"]["coordinates"]  # pixel edges, integers, corners only
    assert sorted(map(tuple, outline[:-1])) == [(5, 5), (5, 9), (9, 5), (9, 9)] and outline[0] == outline[-1]
    assert all(type(v) is int for point in outline for v in point)


def test_geojson_refuses_labels_without_a_class_name(tmp_path: Path) -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[2, 2] = 3
    with pytest.raises(ConfigError, match="mask.geojson: mask label 3 but only 2 class names"):
        export_geojson(mask, CLASSES, tmp_path / "mask.geojson", mpp=None)
    assert not (tmp_path / "mask.geojson").exists()
