"""Tile geometry: ownership, crop windows, gaussian windows, full-res mapping, status grid."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from pipeline.engine.tiling import (
    DEFAULT_FULL_CHUNK,
    MAX_FULL_CHUNK,
    Box,
    Tile,
    crop_windows,
    effective_halo,
    full_res_chunk,
    full_res_owned,
    full_res_pieces,
    gaussian_importance,
    gaussian_windows,
    grid_shape,
    plan_tiles,
    windows_touching,
    work_box_for_full,
    work_shape_for,
)
from pipeline.errors import ConfigError, SegpipeError
from pipeline.job import TileStatus, is_complete
from tests.grid_helpers import assert_single_owner, new_status_grid, tiles_to_run

SHAPES_AND_TILES = [
    ((10, 10), 16),  # H < tile
    ((16, 16), 16),  # H == tile
    ((17, 33), 16),  # H == tile + 1
    ((16, 17), 16),
    ((1, 1), 16),
    ((100, 37), 16),
    ((64, 64), 32),
    ((129, 257), 64),
]


def _paint(boxes, shape_hw) -> np.ndarray:
    counts = np.zeros(shape_hw, dtype=np.int64)
    for b in boxes:
        counts[b.slices()] += 1
    return counts


# --- Box --------------------------------------------------------------------------------


def test_box_helpers():
    b = Box(2, 3, 10, 7)
    assert (b.h, b.w, b.shape) == (8, 4, (8, 4))
    assert b.slices() == (slice(2, 10), slice(3, 7))
    assert b.shift(1, -3) == Box(3, 0, 11, 4)
    assert b.intersect(Box(5, 5, 20, 20)) == Box(5, 5, 10, 7)
    assert b.intersect(Box(10, 0, 12, 5)) is None  # touching edges share no pixel
    assert b.contains(Box(2, 3, 4, 4)) and not b.contains(Box(1, 3, 4, 4))
    assert Box(4, 4, 6, 6).relative_to(b) == Box(2, 1, 4, 3)
    with pytest.raises(ValueError):
        Box(5, 0, 4, 1)


# --- tile grid ----------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "tile"), SHAPES_AND_TILES)
def test_plan_tiles_is_the_chunk_grid_with_one_owner_per_chunk(shape, tile):
    tiles = plan_tiles(shape, tile)
    assert len(tiles) == math.prod(grid_shape(shape, tile))
    assert_single_owner(tiles, shape, tile)
    assert (_paint([t.region for t in tiles], shape) == 1).all()
    for t in tiles:
        r, c = t.index
        assert (t.region.y0, t.region.x0) == (r * tile, c * tile)
        assert t.size == tile


def test_assert_single_owner_catches_gaps_overlaps_and_misalignment():
    tiles = plan_tiles((40, 40), 16)
    with pytest.raises(SegpipeError, match="0 owner"):
        assert_single_owner(tiles[1:], (40, 40), 16)
    with pytest.raises(SegpipeError, match="2 owner"):
        assert_single_owner([*tiles, tiles[0]], (40, 40), 16)
    shifted = Tile((0, 0), Box(0, 8, 16, 24), 16)
    with pytest.raises(SegpipeError, match="not aligned"):
        assert_single_owner([shifted, *tiles[1:]], (40, 40), 16)


def test_grid_shape_rejects_bad_tile():
    with pytest.raises(ConfigError):
        grid_shape((10, 10), 0)


# --- crop windows ---------------------------------------------------------------------


def fake_model(x: np.ndarray, multiple: int) -> np.ndarray:
    """A tiny model with a U-Net's geometry: pads bottom/right to its multiple (reflect),
    pools on the multiple's grid, and adds a 3x3 zero-padded conv (context = halo)."""
    h, w = x.shape
    ph, pw = -h % multiple, -w % multiple
    p = np.pad(x, ((0, ph), (0, pw)), mode="reflect" if ph < h and pw < w else "edge")
    hp, wp = p.shape
    pooled = p.reshape(hp // multiple, multiple, wp // multiple, multiple).sum(axis=(1, 3))
    up = np.repeat(np.repeat(pooled, multiple, 0), multiple, 1)
    out = ndimage.correlate(up + p, np.ones((3, 3)), mode="constant")
    return out[:h, :w]


def run_tiled(x, tile, halo, multiple, max_window) -> tuple[np.ndarray, list]:
    out = np.full(x.shape, np.nan)
    windows = []
    for t in plan_tiles(x.shape, tile):
        for win in crop_windows(t, x.shape, halo, multiple, max_window):
            pred = fake_model(x[win.input.slices()], multiple)
            out[win.keep.slices()] = pred[win.keep.relative_to(win.input).slices()]
            windows.append((t, win))
    return out, windows


CROP_CASES = [
    # (shape, tile, halo, multiple, max_window)
    ((64, 64), 16, 4, 4, 256),
    ((70, 45), 16, 4, 4, 256),
    ((70, 45), 16, 3, 4, 256),  # halo rounded up to 4
    ((13, 70), 16, 8, 8, 256),  # image shorter than one window on one axis
    ((101, 99), 32, 8, 8, 32),  # max_window splits every tile
    ((101, 99), 32, 8, 8, 40),
    ((97, 83), 24, 8, 16, 64),  # tile off the model's grid
    ((5, 7), 16, 4, 4, 256),  # whole image smaller than a tile
    ((200, 130), 48, 16, 16, 64),
]


@pytest.mark.parametrize(("shape", "tile", "halo", "multiple", "max_window"), CROP_CASES)
def test_crop_tiling_equals_whole_image_inference(shape, tile, halo, multiple, max_window):
    x = np.random.default_rng(0).integers(0, 100, shape).astype(np.float64)
    tiled, _ = run_tiled(x, tile, halo, multiple, max_window)
    np.testing.assert_array_equal(tiled, fake_model(x, multiple))


@pytest.mark.parametrize(("shape", "tile", "halo", "multiple", "max_window"), CROP_CASES)
def test_crop_windows_geometry(shape, tile, halo, multiple, max_window):
    h = effective_halo(halo, multiple)
    image = Box(0, 0, *shape)
    for t in plan_tiles(shape, tile):
        windows = crop_windows(t, shape, halo, multiple, max_window)
        assert (_paint([w.keep for w in windows], shape)[t.region.slices()] == 1).all()
        assert sum(w.keep.h * w.keep.w for w in windows) == t.region.h * t.region.w
        for w in windows:
            assert w.input.y0 % multiple == 0 and w.input.x0 % multiple == 0
            assert image.contains(w.input) and w.input.contains(w.keep)
            assert t.region.contains(w.keep)
            assert w.input.y0 <= max(0, w.keep.y0 - h) and w.input.x0 <= max(0, w.keep.x0 - h)
            assert w.input.y1 >= min(shape[0], w.keep.y1 + h)
            assert w.input.x1 >= min(shape[1], w.keep.x1 + h)
            # and no more than the halo, up to the grid step the alignment adds
            assert w.input.y0 > w.keep.y0 - h - multiple and w.input.x0 > w.keep.x0 - h - multiple
            assert w.input.y1 < w.keep.y1 + h + multiple and w.input.x1 < w.keep.x1 + h + multiple
            assert max(w.input.shape) <= max_window


def test_border_windows_read_only_their_halo_inside_the_image():
    shape, tile, halo, multiple = (300, 270), 64, 16, 16
    tiles = {t.index: t for t in plan_tiles(shape, tile)}
    inputs = {i: crop_windows(t, shape, halo, multiple, max_window=512)[0].input for i, t in tiles.items()}
    assert inputs[(2, 2)] == Box(112, 112, 208, 208)  # interior: tile + 2 halo
    assert inputs[(0, 0)] == Box(0, 0, 80, 80)  # nothing read beyond the top-left edge
    # the bottom-right tile owns rows 256..300 and columns 256..270: it reads one halo
    # before them, not a window the interior tiles' size
    assert inputs[(4, 4)] == Box(240, 240, 300, 270)


def test_image_barely_larger_than_a_tile_reads_each_pixel_about_once():
    shape = (1100, 1100)
    read = sum(w.input.h * w.input.w for t in plan_tiles(shape, 1024)
               for w in crop_windows(t, shape, halo=64, multiple=16, max_window=2048))
    assert read < 1.3 * shape[0] * shape[1]  # 4 tiles each reading the whole image: 4x


def test_image_smaller_than_a_tile_is_one_window_covering_it():
    (t,) = plan_tiles((40, 30), 64)
    windows = crop_windows(t, (40, 30), halo=16, multiple=16, max_window=256)
    assert [w.input for w in windows] == [Box(0, 0, 40, 30)]


def test_zero_halo_sliver_at_the_edge_reads_a_grid_step_more():
    # a 6-pixel last tile would pad 10 rows: more than reflect can take from 6
    (_, last) = plan_tiles((16, 1030), 1024)
    (w,) = crop_windows(last, (16, 1030), halo=0, multiple=16, max_window=2048)
    assert w.input == Box(0, 1008, 16, 1030)


def test_max_window_splits_into_equal_aligned_subkeeps():
    (t,) = [t for t in plan_tiles((4096, 4096), 1024) if t.index == (1, 1)]
    windows = crop_windows(t, (4096, 4096), halo=64, multiple=32, max_window=1024)
    assert len(windows) == 4
    assert {w.keep.shape for w in windows} == {(512, 512)}
    assert {w.input.shape for w in windows} == {(640, 640)}


def test_effective_halo_rounds_up_to_the_multiple():
    assert [effective_halo(h, 32) for h in (0, 1, 32, 64, 65)] == [0, 32, 32, 64, 96]
    with pytest.raises(ConfigError):
        effective_halo(-1, 32)


def test_max_window_too_small_for_the_halo_is_a_config_error():
    (t,) = plan_tiles((256, 256), 256)[:1]
    with pytest.raises(ConfigError, match="max_window"):
        crop_windows(t, (512, 512), halo=64, multiple=32, max_window=128)


# --- gaussian windows -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "window", "overlap"),
    [((100, 100), 32, 0.25), ((33, 70), 32, 0.5), ((20, 100), 32, 0.0), ((64, 64), 64, 0.5)],
)
def test_gaussian_windows_cover_the_image_and_reach_its_end(shape, window, overlap):
    boxes = gaussian_windows(shape, window, overlap)
    assert (_paint(boxes, shape) >= 1).all()
    assert max(b.y1 for b in boxes) == shape[0] and max(b.x1 for b in boxes) == shape[1]
    assert all(b.h == min(window, shape[0]) and b.w == min(window, shape[1]) for b in boxes)
    assert len(set(boxes)) == len(boxes)
    stride = max(1, int(window * (1 - overlap)))
    ys = sorted({b.y0 for b in boxes})
    assert ys[0] == 0 and all(b - a <= stride for a, b in itertools.pairwise(ys))


def test_gaussian_windows_smaller_image_than_window():
    assert gaussian_windows((20, 10), 32, 0.5) == [Box(0, 0, 20, 10)]
    assert gaussian_windows((20, 100), (16, 64), 0.5)[0] == Box(0, 0, 16, 64)


def test_importance_map_is_positive_symmetric_with_max_one():
    for shape in [(1, 1), (5, 8), (32, 32), (200, 120)]:
        g = gaussian_importance(shape)
        assert g.dtype == np.float32 and g.shape == shape
        assert g.max() == 1.0 and (g > 0).all()
        np.testing.assert_array_equal(g, g[::-1, :])
        np.testing.assert_array_equal(g, g[:, ::-1])
    tiny = gaussian_importance((200, 200), sigma_scale=0.01)  # underflows far from centre
    assert (tiny > 0).all()


def test_tile_local_gaussian_blend_equals_global_blend():
    shape, window = (90, 75), 32
    x = np.random.default_rng(1).random(shape)
    boxes = gaussian_windows(shape, window, 0.5)

    def predict(b: Box) -> np.ndarray:  # windows disagree, so the weights matter
        return x[b.slices()] + b.y0 * 0.01 + b.x0 * 0.001

    num, den = np.zeros(shape), np.zeros(shape)
    for b in boxes:
        w = gaussian_importance(b.shape)
        num[b.slices()] += w * predict(b)
        den[b.slices()] += w
    expected = num / den

    out = np.full(shape, np.nan)
    for t in plan_tiles(shape, 16):
        r = t.region
        num_t, den_t = np.zeros(r.shape), np.zeros(r.shape)
        for b in windows_touching(t, boxes):
            part = b.intersect(r)
            w = gaussian_importance(b.shape)[part.relative_to(b).slices()]
            num_t[part.relative_to(r).slices()] += w * predict(b)[part.relative_to(b).slices()]
            den_t[part.relative_to(r).slices()] += w
        out[r.slices()] = num_t / den_t
    np.testing.assert_array_equal(out, expected)


# --- working level <-> full resolution --------------------------------------------------


def test_work_shape_for_target_size_and_factor():
    assert work_shape_for((2000, 2500), (512, 512)) == (512, 512)
    assert work_shape_for((3567, 4443), 2.0) == (1784, 2222)
    assert work_shape_for((3, 3), 8.0) == (1, 1)
    assert work_shape_for((256, 256), 0.5) == (512, 512)
    with pytest.raises(ConfigError):
        work_shape_for((10, 10), 0.0)
    with pytest.raises(ConfigError):
        work_shape_for((10, 10), (0, 5))


def test_full_res_chunk():
    assert full_res_chunk(1024, (2.0, 2.0)) == 2048
    assert full_res_chunk(1024, (1.0, 1.0)) == 1024
    assert full_res_chunk(512, (2000 / 512, 2000 / 512)) == 2000  # 512 * 3.90625
    assert full_res_chunk(100, (2000 / 512, 2000 / 512)) == DEFAULT_FULL_CHUNK
    assert full_res_chunk(256, (2.0, 3.0)) == 512  # common square chunk: the smaller
    assert full_res_chunk(256, (4443 / 2222, 3567 / 1784)) == DEFAULT_FULL_CHUNK


def test_full_res_chunk_is_bounded_whatever_the_scale():
    # lung-xray (256²) with the default tile on an 8192² and a 32768² X-ray: tile * scale
    # is 32768 and 131072, a 1 GiB and a 16 GiB chunk; cut into divisors, still tile-aligned
    assert full_res_chunk(1024, (32.0, 32.0)) == MAX_FULL_CHUNK == 2048
    assert full_res_chunk(1024, (128.0, 128.0)) == 2048
    assert full_res_chunk(1024, (2000 / 256, 2000 / 256)) == 2000  # 8000 = 4 x 2000
    assert full_res_chunk(1024, (3.0, 3.0)) == 1536
    assert full_res_chunk(1024, (2.0, 2.0)) == 2048  # unchanged where already bounded
    for tile in (16, 256, 1024, 4096, 16384):
        for scale in (0.25, 1.0, 2.0, 3.999, 7.8125, 32.0, 100.0, 1000.0):
            assert 1 <= full_res_chunk(tile, (scale, scale)) <= MAX_FULL_CHUNK


@pytest.mark.parametrize(("full_hw", "work_hw", "tile"), [
    ((16384, 16384), (256, 256), 1024),
    ((9000, 5000), (256, 256), 64),
    ((1000, 777), (64, 48), 16),
    ((100, 120), (100, 120), 16),
])  # fmt: skip
def test_full_res_pieces_partition_each_owned_box_into_bounded_whole_chunks(full_hw, work_hw, tile):
    chunk = full_res_chunk(tile, (full_hw[0] / work_hw[0], full_hw[1] / work_hw[1]))
    painted = np.zeros(grid_shape(full_hw, chunk), np.int64)  # per chunk: pieces are whole chunks
    for t in plan_tiles(work_hw, tile):
        owned = full_res_owned(t, work_hw, full_hw, chunk)
        pieces = full_res_pieces(owned, chunk)
        assert bool(pieces) != owned.is_empty
        for p in pieces:
            assert owned.contains(p) and max(p.shape) <= max(chunk, MAX_FULL_CHUNK)
            assert p.y0 % chunk == 0 and p.x0 % chunk == 0
            assert (p.y1 % chunk == 0 or p.y1 == full_hw[0]) and (p.x1 % chunk == 0 or p.x1 == full_hw[1])
            painted[p.y0 // chunk : -(-p.y1 // chunk), p.x0 // chunk : -(-p.x1 // chunk)] += 1
    assert (painted == 1).all()


FULL_RES_CASES = [
    # (full_hw, work_hw, tile, full_chunk or None for full_res_chunk's choice)
    ((64, 64), (64, 64), 16, None),  # factor 1
    ((128, 96), (64, 48), 16, None),  # factor 2
    ((2000, 2000), (512, 512), 64, None),  # factor 3.906: 64 * 3.906 = 250, an integer
    ((2000, 2000), (512, 512), 96, None),  # 96 * 3.906 = 375.0
    ((2000, 2000), (512, 512), 100, None),  # 390.6 -> DEFAULT_FULL_CHUNK
    ((2000, 2500), (512, 512), 64, None),  # non-square factors
    ((2000, 1500), (512, 512), 128, 256),
    ((100, 120), (100, 120), 16, 64),  # tiles owning no full-res chunk
    ((3567, 4443), (1784, 2222), 256, None),
    ((50, 70), (128, 128), 32, None),  # working level larger than full resolution
    ((16384, 16384), (256, 256), 1024, None),  # lung-xray's scale: one tile, 8x8 chunks of 2048
    ((20000, 20000), (256, 256), 64, None),  # 64 * 78.125 = 5000, cut to 1250
    ((30000, 9000), (256, 256), 128, None),  # non-square, large factors
]


@pytest.mark.parametrize(("full_hw", "work_hw", "tile", "chunk"), FULL_RES_CASES)
def test_full_res_chunks_each_have_one_owner_tile(full_hw, work_hw, tile, chunk):
    scale = (full_hw[0] / work_hw[0], full_hw[1] / work_hw[1])
    chunk = chunk or full_res_chunk(tile, scale)
    owned = []
    for t in plan_tiles(work_hw, tile):
        box = full_res_owned(t, work_hw, full_hw, chunk)
        if not box.is_empty:
            owned.append(Tile(t.index, box, chunk))
            # the rule: each owned chunk's first row/column maps into the tile's region
            for y in range(box.y0, box.y1, chunk):
                assert t.region.y0 <= y * work_hw[0] // full_hw[0] < t.region.y1
            for x in range(box.x0, box.x1, chunk):
                assert t.region.x0 <= x * work_hw[1] // full_hw[1] < t.region.x1
    assert_single_owner(owned, full_hw, chunk)


def _random_geometries(n: int, seed: int = 7):
    """(full_hw, work_hw, tile): working levels from 1/200 of the image to twice it, tiles
    from 16 to 4096, integer and awkward scales alike (a seeded draw: the same every run)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        full_hw = tuple(int(v) for v in rng.integers(1, 40_000, 2))
        factor = float(np.exp(rng.uniform(np.log(0.5), np.log(200))))
        if rng.random() < 0.3:  # whole factors make tile * scale whole: the aligned case
            factor = float(rng.choice([1, 2, 4, 8, 16, 32, 64]))
        work_hw = tuple(max(1, round(v / factor)) for v in full_hw)
        yield full_hw, work_hw, int(rng.choice([16, 100, 256, 512, 1000, 1024, 2048, 4096]))


def test_full_res_chunks_are_bounded_and_each_has_one_owner_over_many_geometries():
    """Whatever the model's scale (a 1024 tile at 16x was a 16384² chunk), the full-resolution
    chunk is at most 2048 a side, and every chunk of the mask has exactly one owner tile,
    whose pieces are whole chunks of it at most 2048² (invariants 1 and 3)."""
    for full_hw, work_hw, tile in _random_geometries(300):
        scale = (full_hw[0] / work_hw[0], full_hw[1] / work_hw[1])
        chunk = full_res_chunk(tile, scale)
        assert 1 <= chunk <= MAX_FULL_CHUNK, (full_hw, work_hw, tile)
        if grid_shape(work_hw, tile)[0] * grid_shape(work_hw, tile)[1] > 4096:
            continue  # the ownership check below is per tile; keep the test quick
        owners = np.zeros(grid_shape(full_hw, chunk), np.int64)
        for t in plan_tiles(work_hw, tile):
            box = full_res_owned(t, work_hw, full_hw, chunk)
            for p in full_res_pieces(box, chunk):
                assert max(p.shape) <= MAX_FULL_CHUNK
                owners[p.y0 // chunk : -(-p.y1 // chunk), p.x0 // chunk : -(-p.x1 // chunk)] += 1
        assert (owners == 1).all(), (full_hw, work_hw, tile, chunk)


def test_full_res_owned_lines_up_with_tiles_for_integer_factor():
    work_hw, full_hw, tile = (48, 40), (96, 80), 16
    chunk = full_res_chunk(tile, (2.0, 2.0))
    for t in plan_tiles(work_hw, tile):
        doubled = Box(*(2 * v for v in (t.region.y0, t.region.x0, t.region.y1, t.region.x1)))
        assert full_res_owned(t, work_hw, full_hw, chunk) == doubled


def _bilinear_sources(f: int, work: int, full: int) -> tuple[int, int]:
    # torch's align_corners=False source index rule, clamped at 0 and at the last row
    src = max(0.0, (f + 0.5) * work / full - 0.5)
    i0 = min(int(math.floor(src)), work - 1)
    return i0, min(i0 + 1, work - 1)


@pytest.mark.parametrize(
    ("full_hw", "work_hw"),
    [((100, 90), (25, 40)), ((64, 64), (64, 64)), ((2000, 2000), (512, 512)), ((30, 30), (70, 20))],
)
def test_work_box_for_full_holds_every_pixel_bilinear_reads(full_hw, work_hw):
    corner = Box(full_hw[0] - 7, full_hw[1] - 9, *full_hw)
    for box in [Box(0, 0, *full_hw), Box(3, 5, 17, 29), corner]:
        need = work_box_for_full(box, work_hw, full_hw, margin=0)
        assert Box(0, 0, *work_hw).contains(need)
        for y in range(box.y0, box.y1):
            for src in _bilinear_sources(y, work_hw[0], full_hw[0]):
                assert need.y0 <= src < need.y1
        for x in range(box.x0, box.x1):
            for src in _bilinear_sources(x, work_hw[1], full_hw[1]):
                assert need.x0 <= src < need.x1
    grown = work_box_for_full(Box(10, 10, 20, 20), work_hw, full_hw, margin=2)
    tight = work_box_for_full(Box(10, 10, 20, 20), work_hw, full_hw, margin=0)
    assert grown.contains(tight)


# --- status grid --------------------------------------------------------------------------


def test_status_grid_tracks_what_is_left():
    status = new_status_grid((2, 3))
    assert status.dtype == np.uint8 and (status == TileStatus.PENDING).all()
    assert not is_complete(status)
    status[0, 0] = TileStatus.DONE
    status[0, 1] = TileStatus.SKIPPED
    status[1, 2] = TileStatus.FAILED
    assert tiles_to_run(status) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    status[:] = TileStatus.DONE
    status[1, 1] = TileStatus.SKIPPED
    assert is_complete(status) and tiles_to_run(status) == []
