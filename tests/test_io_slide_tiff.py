"""The `tiff` export: a palette-coloured pyramidal TIFF that OpenSlide reads with all its
levels, read back by OpenSlide itself and by tifffile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from pipeline.display import class_colour
from pipeline.io.exports import EXPORT_TILE
from pipeline.io.slide_tiff import export_slide_tiff
from pipeline.store.layout import pyramid_shapes
from tests.io_fixtures import ReadRecorder

CLASSES = ("tumour", "stroma", "necrosis")


def _labels(height: int, width: int) -> np.ndarray:
    """Three classes in blocks and stripes, so every level holds all of them."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 10 : height // 2, width // 10 : width // 2] = 1
    mask[height // 2 :, width // 2 :] = 2
    mask[:, width // 2 - 100 : width // 2 - 60] = 3
    return mask


def _pyramid(tmp_path: Path, full: np.ndarray) -> list[zarr.Array]:
    """The store's mask pyramid (its level shapes, x2 nearest-neighbour), as zarr arrays."""
    shapes = pyramid_shapes(full.shape)
    levels = [full[:: 2**k, :: 2**k] for k in range(len(shapes))]
    assert [a.shape for a in levels] == shapes
    return [zarr.create_array(tmp_path / f"{k}.zarr", data=a, chunks=(256, 256)) for k, a in enumerate(levels)]


def _labels_from_rgba(rgba: np.ndarray, n_classes: int) -> np.ndarray:
    """Map RGBA pixels back to labels through the palette; a colour not in it fails."""
    table = {(0, 0, 0): 0} | {class_colour(k): k for k in range(1, n_classes + 1)}
    colours = [tuple(c) for c in rgba[..., :3].reshape(-1, 3)]
    unknown = set(colours) - set(table)
    assert not unknown, f"colours outside the palette: {sorted(unknown)[:5]}"
    return np.array([table[c] for c in colours], np.uint8).reshape(rgba.shape[:2])


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, list[zarr.Array]]:
    levels = _pyramid(tmp_path, _labels(3000, 2500))
    path = export_slide_tiff(levels, CLASSES, tmp_path / "mask.tif", mpp=0.25)
    return Path(path), levels


def test_openslide_reads_every_level_in_class_colours(exported) -> None:
    path, levels = exported
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count == len(levels) >= 3
        assert slide.level_dimensions == tuple((a.shape[1], a.shape[0]) for a in levels)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
        for k, level in enumerate(levels):
            # a window across a class border, in level-0 coordinates as OpenSlide takes them
            y, x = level.shape[0] // 2 - 50, level.shape[1] // 2 - 120
            rgba = np.asarray(slide.read_region((x * 2**k, y * 2**k), k, (300, 200)))
            assert (rgba[..., 3] == 255).all()
            np.testing.assert_array_equal(_labels_from_rgba(rgba, len(CLASSES)), level[y : y + 200, x : x + 300])
        names = {d["value"]: d["name"] for d in json.loads(slide.properties["openslide.comment"])["labels"]}
        assert names == {0: "background", 1: "tumour", 2: "stroma", 3: "necrosis"}
        thumbnail = np.asarray(slide.get_thumbnail((256, 256)))
        assert max(thumbnail.shape[:2]) == 256
        assert tuple(thumbnail[-5, -5]) == class_colour(2)  # the thumbnail shows colours, not 0/1


def test_tifffile_reads_the_pyramid_palette_and_class_names(exported) -> None:
    path, levels = exported
    with tifffile.TiffFile(path) as tif:
        assert not tif.is_ome
        [series] = tif.series
        assert [level.shape for level in series.levels] == [a.shape for a in levels]
        for level, expected in zip(series.levels, levels, strict=True):
            np.testing.assert_array_equal(level.asarray(), expected[...])
        for page in tif.pages:  # every level carries the palette: readers decode each alone
            assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
            assert page.is_tiled and page.tilewidth == EXPORT_TILE
            colormap = page.colormap
            assert tuple(colormap[:, 0]) == (0, 0, 0)
            for k in range(1, len(CLASSES) + 1):
                assert tuple(int(v) // 257 for v in colormap[:, k]) == class_colour(k)
        assert [p.subfiletype for p in tif.pages] == [0] + [1] * (len(levels) - 1)
        labels = json.loads(tif.pages[0].description)["labels"]
        assert [(d["name"], tuple(d["color"])) for d in labels[1:]] == [
            (name, class_colour(k)) for k, name in enumerate(CLASSES, start=1)
        ]


def test_slide_tiff_reads_the_mask_tile_by_tile(tmp_path: Path) -> None:
    full = _labels(1200, 1500)
    levels = [ReadRecorder(full), ReadRecorder(full[::2, ::2])]
    export_slide_tiff(levels, CLASSES, tmp_path / "mask.tif", mpp=None)
    assert max(r for level in levels for r in level.reads) <= EXPORT_TILE**2
    assert len(levels[0].reads) == 3 * 3
    with openslide.OpenSlide(tmp_path / "mask.tif") as slide:
        assert slide.level_count == 2 and openslide.PROPERTY_NAME_MPP_X not in slide.properties
