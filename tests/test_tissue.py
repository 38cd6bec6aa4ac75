"""Tissue detection: background tiles are found exactly; the real slide agrees with the
algorithmic mask stored beside it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from skimage.transform import resize

from pipeline.config import RunConfig
from pipeline.engine.tiling import plan_tiles
from pipeline.engine.tissue import skipped_tiles, tile_tissue_fraction, tissue_mask
from pipeline.errors import InputError

log = logging.getLogger(__name__)


def synthetic_slide(
    rng: np.random.Generator, grid: tuple[int, int] = (6, 8), tile: int = 64
) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """White glass (slightly tinted, noisy) with pink/purple noisy tissue filling a
    random 30% of the tiles; returns the image and the tissue tiles."""
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    picked = rng.choice(len(cells), int(0.3 * len(cells)), replace=False)
    tissue = {cells[i] for i in picked}
    shape = (grid[0] * tile, grid[1] * tile, 3)
    glass = 240 + rng.integers(0, 8, 3) + rng.integers(-4, 5, shape)
    image = np.clip(glass, 0, 255).astype(np.uint8)
    for r, c in tissue:
        low, high = np.array([150, 40, 120]), np.array([230, 120, 200])  # H&E pink/purple
        patch = rng.integers(low, high, (tile, tile, 3))
        image[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = patch
    return image, tissue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_background_tiles_are_exactly_the_skipped_ones(seed):
    image, tissue = synthetic_slide(np.random.default_rng(seed))
    mask = tissue_mask(image)
    tiles = plan_tiles(image.shape[:2], 64)
    fractions = tile_tissue_fraction(mask, tiles, image.shape[:2])
    background = {t.index for t in tiles} - tissue
    assert skipped_tiles(fractions, 0.5) == background
    # at the run's default threshold the safety margin keeps tiles next to tissue
    assert skipped_tiles(fractions, RunConfig().tissue_threshold) <= background


@pytest.mark.parametrize("seed", [0, 1])
def test_a_small_thumbnail_finds_the_same_tiles(seed):
    """Detection runs on a thumbnail 1/8 of the working level; fractions map it back."""
    image, tissue = synthetic_slide(np.random.default_rng(seed))
    thumb = resize(image, (48, 64), anti_aliasing=True, preserve_range=True).astype(np.uint8)
    tiles = plan_tiles(image.shape[:2], 64)
    fractions = tile_tissue_fraction(tissue_mask(thumb), tiles, image.shape[:2])
    assert skipped_tiles(fractions, 0.5) == {t.index for t in tiles} - tissue


def test_fractions_map_a_coarse_mask_onto_the_working_level():
    mask = np.zeros((10, 10), bool)
    mask[:5] = True  # top half tissue
    tiles = plan_tiles((1000, 1000), 250)
    fractions = tile_tissue_fraction(mask, tiles, (1000, 1000))
    assert fractions == {(r, c): 1.0 if r < 2 else 0.0 for r in range(4) for c in range(4)}


def test_fractions_count_partial_mask_pixels_by_area():
    mask = np.array([[1, 0], [0, 0]], bool)  # one coarse pixel = work [0, 50) x [0, 50)
    tiles = plan_tiles((100, 100), 40)  # tile (0, 0) is 40x40 inside it; (0, 1) half in
    fractions = tile_tissue_fraction(mask, tiles, (100, 100))
    assert fractions[(0, 0)] == 1.0
    assert fractions[(0, 1)] == pytest.approx(10 * 40 / (40 * 40))
    assert fractions[(2, 2)] == 0.0
    assert fractions[(1, 1)] == pytest.approx(10 * 10 / (40 * 40))


def test_fractions_from_a_mask_finer_than_the_working_level():
    mask = np.zeros((300, 200), np.uint8)  # any dtype: nonzero is tissue
    mask[:, :150] = 255  # ten mask pixels per work pixel: columns 0-14 at the working level
    fractions = tile_tissue_fraction(mask, plan_tiles((30, 20), 10), (30, 20))
    assert fractions == {(r, c): 0.5 * (2 - c) for r in range(3) for c in range(2)}


def test_skipped_tiles_are_strictly_below_the_threshold():
    assert skipped_tiles({(0, 0): 0.0, (0, 1): 0.02, (1, 0): 0.019}, 0.02) == {(0, 0), (1, 0)}


@pytest.mark.parametrize(
    ("value", "expected"),
    [((245, 245, 245), False), ((120, 120, 120), True), ((220, 120, 190), True)],
)
def test_flat_thumbnails_do_not_crash(value, expected):
    mask = tissue_mask(np.full((64, 64, 3), value, np.uint8))
    assert mask.shape == (64, 64) and mask.dtype == bool
    assert bool(mask.all()) is expected and bool(mask.any()) is expected


def test_all_white_noisy_thumbnail_has_no_tissue():
    rng = np.random.default_rng(3)
    glass = np.clip(245 + rng.integers(-6, 7, (80, 90, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3))]
)
def test_thumbnail_must_be_rgb_uint8(bad):
    with pytest.raises(InputError, match="thumbnail"):
        tissue_mask(bad)


def test_fraction_mask_must_be_2d():
    with pytest.raises(InputError, match="tissue mask"):
        tile_tissue_fraction(np.zeros((4, 4, 3), bool), plan_tiles((8, 8), 4), (8, 8))


def test_real_slide_agrees_with_its_algorithmic_mask(real_data):
    tifffile = pytest.importorskip("tifffile")
    folder = real_data / "wsi-tcga-cr-7395"
    reference = np.load(folder / "tissue-mask-tcga-cr-7395.npy")
    with tifffile.TiffFile(folder / "tcga-cr-7395-01a-01-ts1.svs") as tif:
        level = tif.series[0].levels[-1].asarray()
    thumb = resize(level, reference.shape, anti_aliasing=True, preserve_range=True)
    mask = tissue_mask(np.clip(thumb, 0, 255).astype(np.uint8))
    iou = (mask & reference).sum() / (mask | reference).sum()
    log.warning("tissue IoU vs the stored histolab mask: %.3f", iou)
    assert iou >= 0.9


def test_fractions_tolerate_a_scaled_border_past_the_mask_edge():
    """A mask whose size is not an exact fraction of the working level (here 989 rows for
    2961): the last tile's scaled end rounds past the mask and must be clamped."""
    mask = np.ones((989, 740), bool)
    fractions = tile_tissue_fraction(mask, plan_tiles((2961, 2216), 1024), (2961, 2216))
    assert all(f == pytest.approx(1.0) for f in fractions.values())
