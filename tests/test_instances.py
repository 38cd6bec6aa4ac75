"""Instance ids across tiles (pipeline.instances) and the instance label image a run writes
(labels/nuclei beside the mask): an instance crossing tile borders, a tile corner or the
image border has one id, ids are unique per image and do not depend on the tile order;
the store is valid OME-NGFF and its instance count reaches the summary and run table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Reader
from ome_zarr_models.v05.image import Image as NgffImage
from PIL import Image as PILImage
from scipy import ndimage

from flows.console import results_table, status_table
from flows.report import from_summary
from pipeline import instances
from pipeline.cards import ModelCard
from pipeline.engine.predictor import Predictor
from pipeline.errors import CheckpointError
from pipeline.local import segment
from pipeline.models import build_model, checkpoint
from pipeline.store import OutputStore

SPEC = {"name": "nuclei", "seed_class": 1, "grow_px": 2, "min_px": 4}


def probs_of(classes: np.ndarray) -> np.ndarray:
    """(h, w) classes 0/1/2 -> (h, w, 3) confident probabilities."""
    return np.eye(3, dtype=np.float32)[classes] * 0.8 + 0.2 / 3


def draw_nuclei(hw: tuple[int, int], centres: list[tuple[int, int]], radius: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Classes (0 background, 1 interior, 2 a 2-px ring) and the truth (h, w) of instances
    1..n, one disc per centre; discs may touch, their rings keep them apart."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    classes = np.zeros(hw, np.uint8)
    truth = np.zeros(hw, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        d = np.hypot(yy - cy, xx - cx)
        classes[(d <= radius + 2) & (classes == 0)] = 2
        classes[d <= radius] = 1
        truth[d <= radius] = i
    return classes, truth


def tiled_keys(probs: np.ndarray, tile: int, margin: int, order: list[tuple[int, int]] | None = None,
               spec: dict = SPEC) -> np.ndarray:
    """What the engine's tiles write: each tile's keys derived on its region grown by the
    margin, its own region kept, tiles taken in `order`."""
    h, w = probs.shape[:2]
    grid = [(r, c) for r in range(-(-h // tile)) for c in range(-(-w // tile))]
    out = np.zeros((h, w), np.uint32)
    for r, c in order or grid:
        y0, x0 = r * tile, c * tile
        wy0, wx0 = max(0, y0 - margin), max(0, x0 - margin)
        wy1, wx1 = min(h, y0 + tile + margin), min(w, x0 + tile + margin)
        keys = instances.instance_keys(probs[wy0:wy1, wx0:wx1], spec, (wy0, wx0), (h, w))
        out[y0 : y0 + tile, x0 : x0 + tile] = keys[y0 - wy0 : y0 - wy0 + tile, x0 - wx0 : x0 - wx0 + tile]
    return out


def ids_per_instance(ids: np.ndarray, truth: np.ndarray) -> dict[int, set[int]]:
    return {int(i): set(np.unique(ids[truth == i]).tolist()) for i in np.unique(truth) if i}


# -- the id scheme (pure) ---------------------------------------------------------------


def test_instances_crossing_tile_borders_corners_and_the_image_border_get_one_id():
    # 96x128 in 32-px tiles; a nucleus across a vertical border, across a horizontal one,
    # on a four-tile corner, cut by the image's top and left edges, and two touching
    # nuclei astride a border
    centres = [(16, 32), (32, 80), (64, 64), (0, 110), (50, 0), (80, 20), (80, 34)]
    classes, truth = draw_nuclei((96, 128), centres)
    ids = instances.compact_ids(keys := tiled_keys(probs_of(classes), 32, 16), instances.unique_keys([keys]))
    seen = ids_per_instance(ids, truth)
    assert all(len(s) == 1 and 0 not in s for s in seen.values()), seen
    assert len({next(iter(s)) for s in seen.values()}) == len(centres)  # unique per image
    assert set(np.unique(ids)) == set(range(len(centres) + 1))  # compact: 1..n
    # the same as deriving the whole image at once (no tiles)
    assert np.array_equal(ids, instances.derive(probs_of(classes), SPEC))


def test_ids_do_not_depend_on_the_tile_order_and_follow_the_anchors_raster_order():
    classes, truth = draw_nuclei((96, 128), [(64, 64), (10, 100), (40, 31)])
    probs = probs_of(classes)
    grid = [(r, c) for r in range(3) for c in range(4)]
    first = tiled_keys(probs, 32, 16, grid)
    shuffled = [grid[i] for i in np.random.default_rng(0).permutation(len(grid))]
    assert np.array_equal(first, tiled_keys(probs, 32, 16, shuffled))
    ids = instances.compact_ids(first, instances.unique_keys([first]))
    # raster order of the anchors: the nucleus at the top gets 1, the lowest 3
    assert [next(iter(ids_per_instance(ids, truth)[i])) for i in (2, 3, 1)] == [1, 2, 3]


def test_an_instance_wider_than_the_margin_may_be_cut_the_stated_limit():
    classes, truth = draw_nuclei((64, 64), [(32, 32)], radius=20)
    keys = tiled_keys(probs_of(classes), 32, 4)
    assert len(ids_per_instance(keys, truth)[1]) > 1  # cut: why the margin is the halo
    assert len(ids_per_instance(tiled_keys(probs_of(classes), 32, 32), truth)[1]) == 1


def test_keys_refuse_a_level_uint32_cannot_name():
    with pytest.raises(ValueError, match="uint32"):
        instances.check_key_space((70_000, 70_000))
    instances.check_key_space((65_535, 65_535))


# -- the watershed split ------------------------------------------------------------------

SPLIT = SPEC | {"grow_px": 0, "split": "watershed", "marker_prob": 0.75, "marker_dist": 1.0, "marker_px": 4}


def merged_pairs(hw: tuple[int, int], pairs: list[tuple[int, int]], radius: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (h, w, 3) of pairs of touching nuclei whose interiors merge (no ring
    between them: what a model does with small dense nuclei), the interior probability
    highest at each centre, and the truth (h, w): each nucleus its own id, a pixel of both
    the nearer centre's."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    interior = np.zeros(hw, np.float32)
    truth = np.zeros(hw, np.int32)
    nearest = np.full(hw, np.inf)
    for i, (cy, cx) in enumerate(pairs):
        for j, centre in enumerate(((cy, cx), (cy, cx + 2 * radius - 2))):  # overlap 2 px
            d = np.hypot(yy - centre[0], xx - centre[1])
            interior = np.maximum(interior, np.where(d <= radius, 1 - 0.4 * d / radius, 0))
            truth[(d <= radius) & (d < nearest)] = 2 * i + j + 1
            nearest = np.minimum(nearest, d)
    ring = (ndimage.binary_dilation(interior > 0, iterations=2) & (interior == 0)).astype(np.float32)
    probs = np.stack([1 - interior - 0.9 * ring, interior, 0.9 * ring], axis=-1)
    return probs, truth


def test_the_watershed_split_cuts_merged_nuclei_that_components_keep_as_one():
    probs, truth = merged_pairs((48, 64), [(12, 12), (32, 36)])
    whole = instances.derive(probs, SPLIT | {"split": "none"})
    assert all(len(ids_per_instance(whole, truth)[i] - {0}) == 1 for i in (1, 2))
    assert whole.max() == 2  # two pairs, one instance each
    for flood in ("distance", "prob"):
        split = instances.derive(probs, SPLIT | {"flood": flood})
        assert split.max() == 4, flood
        assert len(set(majority_ids(split, truth))) == 4, flood  # each nucleus its own id


def majority_ids(ids: np.ndarray, truth: np.ndarray) -> list[int]:
    """Per true nucleus, the id over most of it, asserted to cover 90 % of it (the pixels
    on the line between two touching nuclei may go either way)."""
    found = []
    for i in np.unique(truth[truth > 0]):
        values, counts = np.unique(ids[truth == i], return_counts=True)
        assert values[counts.argmax()] > 0 and counts.max() >= 0.9 * counts.sum(), (i, values, counts)
        found.append(int(values[counts.argmax()]))
    return found


def test_split_instances_crossing_tile_borders_get_one_id_whatever_the_tile_order():
    # pairs astride a vertical border, a horizontal one and a four-tile corner, and one cut by
    # the image's left edge; each pair 18 px wide, under the 20-px margin
    pairs = [(10, 24), (40, 80), (60, 56), (90, -1), (90, 100)]
    probs, truth = merged_pairs((112, 128), pairs)
    spec = SPLIT | {"grow_px": 2}
    grid = [(r, c) for r in range(4) for c in range(4)]
    keys = tiled_keys(probs, 32, 20, grid, spec)
    shuffled = [grid[i] for i in np.random.default_rng(1).permutation(len(grid))]
    assert np.array_equal(keys, tiled_keys(probs, 32, 20, shuffled, spec))
    ids = instances.compact_ids(keys, instances.unique_keys([keys]))
    assert np.array_equal(ids, instances.derive(probs, spec))  # as the whole image at once
    seen = ids_per_instance(ids, truth)
    assert all(len(s - {0}) == 1 for s in seen.values()), seen
    assert len({min(s - {0}) for s in seen.values()}) == len(seen)  # every nucleus its own id


def test_the_card_refuses_an_unknown_split_or_flood(tmp_path):
    model = build_model("unet", in_channels=3, classes=3, filters=[4, 8])
    for bad, match in (({"split": "cellpose"}, "split"), ({"split": "watershed", "flood": "up"}, "flood"),
                       ({"split": "watershed", "marker_prob": 2}, "marker_prob")):
        with pytest.raises(CheckpointError, match=match):
            checkpoint.save(model, ModelCard(arch="", config={}, class_names=["nucleus", "nucleus boundary"],
                                             instances=SPEC | bad), tmp_path / "m.safetensors")


def test_the_card_declares_instances_on_a_multi_class_output(tmp_path):
    model = build_model("unet", in_channels=3, classes=1, filters=[4, 8])
    with pytest.raises(CheckpointError, match="seed_class"):
        checkpoint.save(model, ModelCard(arch="", config={}, instances={"name": "nuclei"}), tmp_path / "m.safetensors")
        checkpoint.load(tmp_path / "m.safetensors")


# -- a run writes labels/nuclei ---------------------------------------------------------


@pytest.fixture
def synthetic_model(tmp_path, monkeypatch) -> str:
    """A 3-class checkpoint declaring nuclei instances whose probabilities are drawn from
    the input: red = interior, green = boundary ring (the predictor is replaced, so the
    test is about tiles and stores, not about a trained model)."""
    torch.manual_seed(0)
    model = build_model("unet", in_channels=3, classes=3, filters=[4, 8, 16])
    card = ModelCard(arch="", config={}, class_names=["nucleus", "nucleus boundary"], halo=16, instances=SPEC)
    path = tmp_path / "nuclei.safetensors"
    checkpoint.save(model, card, path)

    def drawn(self, windows: np.ndarray) -> np.ndarray:
        classes = np.where(windows[..., 0] > 0.5, 1, np.where(windows[..., 1] > 0.5, 2, 0))
        return probs_of(classes)

    monkeypatch.setattr(Predictor, "__call__", drawn)
    return str(path)


HW = (150, 200)  # 64-px tiles: a 3x4 grid; nuclei on borders, a corner, the image edge
CENTRES = [(64, 30), (20, 64), (64, 128), (0, 90), (100, 199), (110, 60), (110, 74)]


def nuclei_png(path: Path) -> np.ndarray:
    """The drawn nuclei as the synthetic model's input (red interior, green ring); returns
    the true instances."""
    classes, truth = draw_nuclei(HW, CENTRES)
    rgb = np.zeros((*HW, 3), np.uint8)
    rgb[classes == 1, 0] = 255
    rgb[classes == 2, 1] = 255
    PILImage.fromarray(rgb).save(path)
    return truth


@pytest.mark.parametrize("blend", ["crop", "gaussian"])
def test_a_run_writes_one_id_per_nucleus_across_tile_borders(tmp_path, synthetic_model, blend):
    hw, centres = HW, CENTRES
    truth = nuclei_png(tmp_path / "nuclei.png")
    out = segment(tmp_path / "nuclei.png", synthetic_model, tmp_path / "out", tile=64, blend=blend,
                  precision="fp32", exports=("geojson",))  # fmt: skip
    store = OutputStore.open(out)
    ids = np.asarray(store.instance_level(0)[:])
    assert ids.dtype == np.uint32 and ids.shape == hw
    seen = ids_per_instance(ids, truth)
    assert all(len(s) == 1 and 0 not in s for s in seen.values()), seen
    assert len({next(iter(s)) for s in seen.values()}) == len(centres)
    assert set(np.unique(ids)) == set(range(len(centres) + 1))
    mask = np.asarray(store.mask[:])
    assert not (ids[mask == 0]).any() and (ids[mask == 1] > 0).all()  # inside the mask; every interior
    assert store.summary()["instances"] == {"nuclei": len(centres)}
    # the field's readers: valid OME-NGFF 0.5, and ome-zarr-py finds the instance label
    NgffImage.from_zarr(zarr.open_group(out, mode="r"))
    labels = [n for n in Reader(parse_url(str(out)))() if n.data and n.load(Label)]
    assert [n.zarr.parts()[-1] for n in labels] == ["mask", "nuclei"]
    # the count in the run table row (artifact, CLI table) and `segpipe status`'s table
    result = from_summary(store.summary(), 1.0)
    assert result.row()["instances"] == str(len(centres)) and result.instances == {"nuclei": len(centres)}
    for table in (results_table([result]), status_table([store.summary()])):
        column = next(c for c in table.columns if c.header == "instances")
        assert list(column.cells) == [str(len(centres))]
    # the GeoJSON has one nucleus object per instance, the touching pair two
    features = json.loads((tmp_path / "out" / f"{store.image_id}.geojson").read_text())["features"]
    assert len(features) == len(centres)
    assert {f["properties"]["classification"]["name"] for f in features} == {"nucleus"}
    # finalize again (a resumed run): the same ids
    store = OutputStore.open(out, mode="r+")
    store.build_instances()
    assert np.array_equal(np.asarray(store.instance_level(0)[:]), ids)


def test_instance_chunks_are_verified_and_a_rerun_repairs_them(tmp_path, synthetic_model):
    """The tiles' keys and the instance image carry checksums like prob and mask: a flipped
    key chunk names its tile, a lost label chunk is found, and the next runs repair both."""
    from pipeline.store import verify_store

    nuclei_png(tmp_path / "nuclei.png")
    args = (tmp_path / "nuclei.png", synthetic_model, tmp_path / "out")
    out = segment(*args, tile=64, precision="fp32")
    ids = np.asarray(OutputStore.open(out).instance_level(0)[:])
    key_chunk = Path(out, "instances", "nuclei", "c", "1", "1")  # tile (1, 1) holds (110, 74)
    key_chunk.write_bytes(bytes(b ^ 0xFF for b in key_chunk.read_bytes()))
    label_chunk = next(p for p in Path(out, "labels", "nuclei", "0", "c").rglob("*") if p.is_file())
    label_chunk.unlink()

    verdict = verify_store(OutputStore.open(out), full=True)
    assert verdict.damaged_tiles == [(1, 1)]
    lines = verdict.lines()
    assert any(line.startswith("tile (1, 1): instances/nuclei chunk 1/1: ") for line in lines), lines
    assert any(line.startswith("labels/nuclei/0 chunk ") and "missing" in line for line in lines), lines
    # pipeline.segment's finalize finds the damage and marks it; the next call repairs it
    segment(*args, tile=64, precision="fp32")
    segment(*args, tile=64, precision="fp32")
    store = OutputStore.open(out)
    assert store.state == "complete" and verify_store(store, full=True).ok
    assert np.array_equal(np.asarray(store.instance_level(0)[:]), ids)


def test_a_run_splits_merged_nuclei_with_one_id_each_across_tile_borders(tmp_path, monkeypatch):
    """The card's watershed split in a tiled run: merged pairs astride 64-px tile borders and
    a corner come out as one id per nucleus, the ids of the whole image derived at once."""
    model = build_model("unet", in_channels=3, classes=3, filters=[4, 8, 16])
    card = ModelCard(arch="", config={}, class_names=["nucleus", "nucleus boundary"], halo=24,
                     normalization={"kind": "scale", "divisor": 255}, instances=SPLIT)
    checkpoint.save(model, card, path := tmp_path / "split.safetensors")
    # the input carries the probabilities: red = interior, green = ring
    monkeypatch.setattr(Predictor, "__call__", lambda self, w: np.stack(
        [1 - w[..., 0] - w[..., 1], w[..., 0], w[..., 1]], axis=-1).astype(np.float32))
    probs, truth = merged_pairs((150, 200), [(64, 56), (20, 124), (60, 120), (128, 30), (100, 185)])
    rgb = np.zeros((150, 200, 3), np.uint8)
    rgb[..., :2] = np.round(probs[..., 1:] * 255)
    PILImage.fromarray(rgb).save(tmp_path / "pairs.png")
    out = segment(tmp_path / "pairs.png", str(path), tmp_path / "out", tile=64, blend="crop", precision="fp32",
                  exports=())  # fmt: skip
    ids = np.asarray(OutputStore.open(out).instance_level(0)[:])
    assert len(set(majority_ids(ids, truth))) == 10 and ids.max() == 10  # each nucleus its own id
    assert all(len(s - {0}) == 1 for s in ids_per_instance(ids, truth).values())  # none cut by a tile
    drawn = rgb[..., :2].astype(np.float32) / 255
    whole = instances.derive(np.dstack([1 - drawn.sum(-1), drawn]), SPLIT)
    assert np.array_equal(ids, np.where(np.asarray(OutputStore.open(out).mask[:]) > 0, whole, 0))


def test_a_store_without_instances_reads_as_before(tmp_path):
    from pipeline.store.layout import StoreLayout

    plain = StoreLayout("x", (10, 10), (10, 10), 8, 8, ("a",))
    assert "instances" not in plain.to_dict()
    assert StoreLayout.from_dict(plain.to_dict()) == plain
    nuclei = StoreLayout("x", (10, 10), (10, 10), 8, 8, ("a", "b"), instances=("nuclei",))
    assert StoreLayout.from_dict(nuclei.to_dict()).instances == ("nuclei",)
