"""The output store: completion semantics, resume, invariant 1, NGFF layout, provenance, ids."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from pipeline.config import RunConfig
from pipeline.engine.tiling import Box, Tile, plan_tiles
from pipeline.job import TileReport, TileStatus
from pipeline.store import (
    OutputStore,
    StoreError,
    check_provenance,
    pyramid_shapes,
    safe_image_id,
    store_path,
)
from tests.grid_helpers import set_status

SMALL = dict(full_hw=(120, 100), work_hw=(60, 50), tile=16, full_chunk=32)


def _provenance(**run_changes) -> dict:
    return {
        "input": {"path": "in/scan.png", "sha256": "ab" * 32},
        "model": {"sha256": "cd" * 32, "card": {"arch": "unet", "classes": ["lung"]}},
        "run": RunConfig(tile=16).with_(**run_changes).to_dict(),
    }


def _create(path: Path, **overrides) -> OutputStore:
    args = dict(SMALL, image_id="scan", classes=["lung"], mpp=0.5, provenance=_provenance())
    args.update(overrides)
    return OutputStore.create_or_open(path, **args)


def _expected(store: OutputStore) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic probability map and mask for the whole image (test data)."""
    (h, w), (fh, fw) = store.layout.work_hw, store.layout.full_hw
    n = len(store.layout.classes)
    yy, xx = np.mgrid[0:h, 0:w]
    prob = np.stack([((yy * 7 + xx * 3 + k) % 101) / 100.0 for k in range(n)], -1)
    fy, fx = np.mgrid[0:fh, 0:fw]
    mask = ((fy // 3 + fx // 5) % (n + 1)).astype(np.uint8)
    return prob.astype(np.float32), mask


def _write(store: OutputStore, tile: Tile, prob: np.ndarray, mask: np.ndarray) -> None:
    work, full = store.owned_boxes(tile)
    store.write_tile(tile, prob[work.slices()], mask[full.slices()], full)


def _write_tiles(path: str, indices: list[tuple[int, int]]) -> None:
    """A worker process: opens the store by path and writes only its own tiles."""
    store = OutputStore.open(path, mode="r+")
    prob, mask = _expected(store)
    tiles = {t.index: t for t in plan_tiles(store.layout.work_hw, store.layout.tile)}
    for index in indices:
        _write(store, tiles[index], prob, mask)


def _chunk_bytes(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"}


def _all_tiles(store: OutputStore) -> list[Tile]:
    return plan_tiles(store.layout.work_hw, store.layout.tile)


# ---------------------------------------------------------------------------------------
# status and completion


def test_new_store_is_pending_with_every_tile_to_run(tmp_path):
    store = _create(tmp_path / "a.zarr")
    assert store.state == "pending"
    assert store.counts() == {"pending": 16, "done": 0, "skipped": 0, "failed": 0, "total": 16}
    assert len(store.tiles_to_run(_all_tiles(store))) == 16


def test_complete_only_when_every_tile_done_or_skipped(tmp_path):
    store = _create(tmp_path / "a.zarr")
    tiles = _all_tiles(store)
    store.set_many(TileReport(t.index, TileStatus.DONE, seconds=0.5) for t in tiles[:-2])
    with pytest.raises(StoreError, match="cannot mark complete"):
        store.mark_state("complete")
    assert store.finalize() == "partial"  # two tiles never ran
    set_status(store, tiles[-2].index, TileStatus.SKIPPED)
    set_status(store, tiles[-1].index, TileStatus.DONE)
    assert store.finalize() == "complete"
    assert OutputStore.open(tmp_path / "a.zarr").state == "complete"


def test_failed_tile_is_recorded_and_run_again(tmp_path):
    store = _create(tmp_path / "a.zarr")
    tiles = _all_tiles(store)
    store.set_many(TileReport(t.index, TileStatus.DONE) for t in tiles)
    set_status(store, (1, 2), TileStatus.FAILED, error="RuntimeError: CUDA OOM", attempts=3)
    assert store.finalize() == "partial"

    reopened = OutputStore.open(tmp_path / "a.zarr")
    assert reopened.failures() == {(1, 2): {"error": "RuntimeError: CUDA OOM", "attempts": 3}}
    assert [t.index for t in reopened.tiles_to_run(tiles)] == [(1, 2)]
    summary = reopened.summary()
    assert summary["state"] == "partial"
    assert summary["failed"] == [{"tile": [1, 2], "error": "RuntimeError: CUDA OOM", "attempts": 3}]
    json.dumps(summary)

    set_status(store, (1, 2), TileStatus.DONE, seconds=1.5)  # the retry succeeds
    assert store.failures() == {}
    assert store.finalize() == "complete"


def test_failed_without_error_and_unknown_tile_are_refused(tmp_path):
    store = _create(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match="without an error"):
        set_status(store, (0, 0), TileStatus.FAILED)
    with pytest.raises(StoreError, match="outside the 4x4 grid"):
        set_status(store, (4, 0), TileStatus.DONE)
    with pytest.raises(StoreError, match="unknown state"):
        store.mark_state("finished")  # type: ignore[arg-type]


def test_seconds_are_kept_per_tile(tmp_path):
    store = _create(tmp_path / "a.zarr")
    set_status(store, (0, 1), TileStatus.DONE, seconds=2.25)
    seconds = OutputStore.open(tmp_path / "a.zarr")._seconds[...]
    assert seconds[0, 1] == 2.25 and np.isnan(seconds[0, 0])


# ---------------------------------------------------------------------------------------
# resume and mismatches


def test_reopen_keeps_pixels_status_and_provenance(tmp_path):
    store = _create(tmp_path / "a.zarr")
    prob, mask = _expected(store)
    tile = _all_tiles(store)[0]
    _write(store, tile, prob, mask)
    set_status(store, tile.index, TileStatus.DONE)
    store.update_provenance("timings", {"infer_s": 1.25})

    # a resume on another machine: other workers and retries, same pixels
    again = _create(tmp_path / "a.zarr", provenance=_provenance(workers=8, retries=1))
    assert again.status_grid()[0, 0] == TileStatus.DONE
    assert again.provenance["timings"] == {"infer_s": 1.25}
    assert again.provenance["run"]["workers"] is None  # the original record is kept
    work, full = again.owned_boxes(tile)
    np.testing.assert_array_equal(again.mask[full.slices()], mask[full.slices()])


@pytest.mark.parametrize(
    "change, key",
    [
        ({"tile": 32}, "tile"),
        ({"full_hw": (121, 100)}, "full_hw"),
        ({"classes": ["lung", "heart"]}, "classes"),
        ({"prob_dtype": "float32"}, "prob_dtype"),
        ({"provenance": _provenance(blend="gaussian")}, "run.blend"),
        ({"provenance": {**_provenance(), "model": {"sha256": "ee" * 32}}}, "model.sha256"),
    ],
)
def test_mismatched_reopen_is_refused_unless_overwrite(tmp_path, change, key):
    store = _create(tmp_path / "a.zarr")
    set_status(store, (0, 0), TileStatus.DONE)
    with pytest.raises(StoreError, match=key):
        _create(tmp_path / "a.zarr", **change)
    fresh = _create(tmp_path / "a.zarr", overwrite=True, **change)
    assert fresh.counts()["done"] == 0


def test_foreign_zarr_is_never_overwritten(tmp_path):
    foreign = zarr.open_group(tmp_path / "a.zarr", mode="w")
    foreign.create_array("data", shape=(4,), dtype="uint8")
    with pytest.raises(StoreError, match="not a segpipe output store"):
        _create(tmp_path / "a.zarr", overwrite=True)
    assert "data" in zarr.open_group(tmp_path / "a.zarr", mode="r")
    with pytest.raises(StoreError, match="no output store"):
        OutputStore.open(tmp_path / "missing.zarr")


# ---------------------------------------------------------------------------------------
# writing tiles (invariant 1)


def test_write_tile_refuses_boxes_that_are_not_its_own_chunks(tmp_path):
    store = _create(tmp_path / "a.zarr")
    prob, mask = _expected(store)
    tile = _all_tiles(store)[5]  # (1, 1)
    work, full = store.owned_boxes(tile)

    shifted = Tile(tile.index, work.shift(8, 0), tile.size)
    with pytest.raises(StoreError, match="is not its prob chunk"):
        store.write_tile(shifted, prob[shifted.region.slices()], mask[full.slices()], full)
    wrong_full = Box(0, 0, 32, 32)  # tile (0, 0)'s chunk
    with pytest.raises(StoreError, match="is not its own mask chunks"):
        store.write_tile(tile, prob[work.slices()], mask[wrong_full.slices()], wrong_full)
    with pytest.raises(StoreError, match="prob shape"):
        store.write_tile(tile, prob[work.slices()][:, :, 0], mask[full.slices()], full)
    with pytest.raises(StoreError, match="uint8"):
        store.write_tile(tile, prob[work.slices()], mask[full.slices()].astype(np.int32), full)
    with pytest.raises(StoreError, match="label 2 > 1 classes"):
        store.write_tile(tile, prob[work.slices()], mask[full.slices()] * 2, full)
    with pytest.raises(StoreError, match="NaN"):
        store.write_tile(tile, np.full_like(prob[work.slices()], np.nan), mask[full.slices()], full)
    assert not store.mask[...].any()  # nothing was written


def test_rewriting_a_tile_gives_identical_bytes(tmp_path):
    store = _create(tmp_path / "a.zarr")
    prob, mask = _expected(store)
    edge = _all_tiles(store)[-1]  # a partial border tile: read-modify-write in zarr
    _write(store, edge, prob, mask)
    before = _chunk_bytes(tmp_path / "a.zarr")
    _write(store, edge, prob, mask)
    after = _chunk_bytes(tmp_path / "a.zarr")
    assert before == after and len(before) >= 2


def test_finalize_records_checksums_that_a_rewrite_and_refinalize_keep(tmp_path):
    """The digests are of the stored bytes, which are deterministic (fixed codec): a tile
    rewritten and the pyramid rebuilt give the same records (only modification markers move)."""
    from pipeline.store import verify_store
    from pipeline.store.checksums import DIGEST, SIZE

    store = _create(tmp_path / "a.zarr", full_hw=(2100, 100), work_hw=(1050, 50), full_chunk=32)
    prob, mask = _expected(store)
    for tile in _all_tiles(store):
        _write(store, tile, prob, mask)
    store.set_many([TileReport(t.index, TileStatus.DONE) for t in _all_tiles(store)])
    store.finalize()
    names = list(store.checked_arrays())
    assert names == ["prob/0", "prob/1", "labels/mask/0", "labels/mask/1", "labels/mask/2"]
    before = {n: store.checksum_records(n)[:, [DIGEST, SIZE]].copy() for n in names}

    _write(store, _all_tiles(store)[5], prob, mask)
    store.finalize()

    for n in names:
        assert np.array_equal(store.checksum_records(n)[:, [DIGEST, SIZE]], before[n])
    assert verify_store(store).ok and verify_store(store, full=False).ok


def test_uint8_probabilities_round_and_float32_is_exact(tmp_path):
    store = _create(tmp_path / "u8.zarr")
    exact = _create(tmp_path / "f32.zarr", prob_dtype="float32")
    prob, mask = _expected(store)
    for s in (store, exact):
        for tile in _all_tiles(s):
            _write(s, tile, prob, mask)
    assert store.prob.dtype == np.uint8 and store.prob.metadata.dimension_names == ("c", "y", "x")
    stored = np.moveaxis(store.prob[...], 0, -1)  # (C, h, w) on disk, the NGFF axis order
    np.testing.assert_array_equal(stored, np.rint(prob * 255).astype(np.uint8))
    assert np.abs(store.read_prob() - prob).max() <= 0.5 / 255 + 1e-7
    np.testing.assert_array_equal(exact.read_prob(), prob)
    np.testing.assert_array_equal(exact.mask[...], mask)


def test_two_processes_writing_their_own_tiles_lose_no_pixel(tmp_path):
    path = str(tmp_path / "a.zarr")
    store = _create(Path(path), classes=["lung", "heart"])
    assert store.prob.shards is None and store.mask.shards is None
    indices = [t.index for t in _all_tiles(store)]
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_write_tiles, args=(path, indices[i::2])) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]

    prob, mask = _expected(store)
    np.testing.assert_array_equal(np.moveaxis(store.prob[...], 0, -1), np.rint(prob * 255).astype(np.uint8))
    np.testing.assert_array_equal(store.mask[...], mask)


# ---------------------------------------------------------------------------------------
# OME-Zarr layout


def test_ngff_metadata_and_nearest_pyramid(tmp_path):
    full_hw = (2200, 1100)
    store = _create(
        tmp_path / "a.zarr", full_hw=full_hw, work_hw=(1100, 551), tile=128, full_chunk=512,
        classes=["lung", "heart"],
    )  # fmt: skip
    assert pyramid_shapes(full_hw) == [(2200, 1100), (1100, 550), (550, 275)]
    prob, mask = _expected(store)
    for tile in _all_tiles(store):
        _write(store, tile, prob, mask)
    store.set_many(TileReport(t.index, TileStatus.DONE) for t in _all_tiles(store))
    assert store.finalize() == "complete"

    root = zarr.open_group(tmp_path / "a.zarr", mode="r")
    assert root["labels"].attrs["ome"] == {"version": "0.5", "labels": ["mask"]}
    ome = root["labels/mask"].attrs["ome"]
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert ms["axes"][0]["unit"] == "micrometer"
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    label = ome["image-label"]
    assert label["source"] == {"image": "../../"}
    assert [p["class"] for p in label["properties"]] == ["background", "lung", "heart"]
    assert [c["label-value"] for c in label["colors"]] == [p["label-value"] for p in label["properties"]] == [0, 1, 2]

    for k, shape in enumerate(pyramid_shapes(full_hw)):
        level = store.mask_level(k)
        assert level.shape == shape and level.metadata.dimension_names == ("y", "x")
        np.testing.assert_array_equal(level[...], mask[:: 2**k, :: 2**k])
    with pytest.raises(StoreError, match="no mask level 3"):
        store.mask_level(3)
    # the probabilities' pyramid: 2x2 means (an odd edge averaged with itself), rounded
    assert [a.shape for a in store.prob_levels().values()] == [(2, 1100, 551), (2, 550, 276)]
    level0 = store.prob_levels()["prob/0"][...].astype(np.float64)
    padded = np.pad(level0, ((0, 0), (0, 0), (0, 1)), mode="edge")
    means = (padded[:, ::2, ::2] + padded[:, 1::2, ::2] + padded[:, ::2, 1::2] + padded[:, 1::2, 1::2]) / 4
    np.testing.assert_array_equal(store.prob_levels()["prob/1"][...], np.rint(means).astype(np.uint8))

    coarse = mask[::4, ::4]
    fractions = store.summary()["mask_fraction"]
    assert fractions == {
        "lung": round(float((coarse == 1).mean()), 6),
        "heart": round(float((coarse == 2).mean()), 6),
    }


def test_picture_is_the_root_ngff_image_at_the_mask_levels(tmp_path):
    store = _create(tmp_path / "a.zarr", full_hw=(2000, 1000))  # mask levels 2000, 1000
    rgba = np.zeros((2000, 1000, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 255
    rgba[::2, :, 0] = 100
    assert not store.has_picture()
    store.write_picture(da.from_array(rgba, chunks=(700, 300, 4)), None)
    assert store.has_picture()
    root = zarr.open_group(tmp_path / "a.zarr", mode="r")
    (ms,) = root.attrs["ome"]["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1"]  # the mask's levels
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0]]
    assert [c["color"] for c in root.attrs["ome"]["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    assert root["0"].shape == (3, 2000, 1000) and root["1"].shape == (3, 1000, 500)  # alpha dropped
    np.testing.assert_array_equal(root["0"][...], np.moveaxis(rgba[..., :3], -1, 0))
    assert (root["1"][0] == 50).all() and (root["1"][1] == 200).all()  # means of 100 and 0


def test_a_deep_grey_picture_goes_through_the_display_window(tmp_path):
    store = _create(tmp_path / "a.zarr", full_hw=(40, 30))
    grey = np.arange(1200, dtype=np.uint16).reshape(40, 30, 1) * 3
    store.write_picture(da.from_array(grey, chunks=(16, 16, 1)), (300.0, 3300.0))
    picture = zarr.open_group(tmp_path / "a.zarr", mode="r")["0"][...]
    assert picture.shape == (1, 40, 30)
    np.testing.assert_array_equal(picture[0], np.rint(np.clip((grey[..., 0] - 300.0) / 3000, 0, 1) * 255))


def test_mpp_unknown_gives_pixel_scales_without_unit(tmp_path):
    store = _create(tmp_path / "a.zarr", mpp=None)
    (ms,) = zarr.open_group(store.path, mode="r")["labels/mask"].attrs["ome"]["multiscales"]
    assert "unit" not in ms["axes"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]


# ---------------------------------------------------------------------------------------
# provenance


@pytest.mark.parametrize(
    "bad",
    [
        {"PatientName": "DOE^JOHN"},
        {"input": {"dicom": {"PatientID": "123"}}},
        {"input": {"patient_birth_date": "19700101"}},
        {"tags": [{"AccessionNumber": "A1"}]},
        {"(0010,0020)": "123"},
        {"PatientSex": "M"},
    ],
)
def test_provenance_with_patient_identifiers_is_refused(tmp_path, bad):
    with pytest.raises(StoreError, match="patient identifier"):
        check_provenance(bad, "scan")
    with pytest.raises(StoreError, match="patient identifier"):
        _create(tmp_path / "a.zarr", provenance={**_provenance(), **bad})
    assert not (tmp_path / "a.zarr").exists()


def test_update_provenance_is_guarded_and_records_versions(tmp_path):
    store = _create(tmp_path / "a.zarr")
    with pytest.raises(StoreError, match="patient identifier"):
        store.update_provenance("input", {"StudyInstanceUID": "1.2.3"})
    versions = store.provenance["versions"]
    assert {"python", "segpipe", "torch", "zarr", "numpy"} <= versions.keys()
    assert store.provenance["run"] == json.loads(json.dumps(RunConfig(tile=16).to_dict()))


# ---------------------------------------------------------------------------------------
# output names


KEY = bytes(range(32))


def test_safe_image_id_never_escapes_the_output_root(tmp_path):
    for name in ["../../etc/passwd", "/abs/scan.dcm", "..", "...", "", "a b/ c?*.png", ".hidden",
                 "Röntgen.jpg", "x" * 300 + ".png"]:  # fmt: skip
        for label in (None, name, "../x"):
            image_id = safe_image_id(name, KEY, label)
            assert "/" not in image_id and "\\" not in image_id and not image_id.startswith(".")
            out = Path(store_path(tmp_path, image_id)).resolve()
            assert out.parent == tmp_path.resolve()
    assert safe_image_id("/data/a.png", KEY, "chest AP #1").startswith("chest_AP_1-")


def test_safe_image_id_names_no_patient(tmp_path):
    """Invariant 8: the id is a keyed hash of the resolved location, nothing of its name."""
    scan = tmp_path / "DOE_JOHN_19800101" / "DOE_JOHN_ZZPHIA4417_19800101.dcm"
    image_id = safe_image_id(scan, KEY)
    assert len(image_id) == 16 and all(c in "0123456789abcdef" for c in image_id)
    for part in ("DOE", "JOHN", "19800101", "ZZPHIA4417"):
        assert part not in image_id
    assert safe_image_id(scan, bytes(32)) != image_id  # another output root, another id


def test_safe_image_id_is_one_per_file_however_it_is_named(tmp_path, monkeypatch):
    scan = tmp_path / "p1" / "scan.dcm"
    scan.parent.mkdir()
    scan.write_bytes(b"x")
    link = tmp_path / "link.dcm"
    link.symlink_to(scan)
    monkeypatch.chdir(tmp_path)
    names = [scan, str(scan), "p1/scan.dcm", "./p1/../p1/scan.dcm", link]
    assert len({safe_image_id(n, KEY) for n in names}) == 1
    assert safe_image_id(scan, KEY) != safe_image_id(tmp_path / "p2" / "scan.dcm", KEY)
    assert safe_image_id("s3://bucket/x/scan.svs", KEY) != safe_image_id("s3://bucket/y/scan.svs", KEY)


def test_output_key_is_created_once_private_and_kept(tmp_path):
    from pipeline.store import output_key

    out = tmp_path / "out"
    key = output_key(out)
    assert len(key) == 32 and output_key(out) == key
    assert (out / ".segpipe-key").stat().st_mode & 0o777 == 0o600
    (out / ".segpipe-key").write_text("garbled")
    with pytest.raises(StoreError, match="not a segpipe id key"):
        output_key(out)
    assert len(output_key("memory://keys/out")) == 32 and output_key("memory://keys/out") == output_key("memory://keys/out")


def test_store_path_refuses_unsafe_ids(tmp_path):
    for bad in ["../x", "/x", "", ".x", "a/b"]:
        with pytest.raises(StoreError, match="unsafe image id"):
            store_path(tmp_path, bad)
    assert store_path("s3://bucket/out/", "scan-0a") == "s3://bucket/out/scan-0a.zarr"


def test_a_changed_setting_needs_overwrite_and_the_same_output_resumes(tmp_path, tiny_checkpoint):
    import PIL.Image

    import pipeline

    image = tmp_path / "x.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    first = pipeline.segment(image, tiny_checkpoint, tmp_path / "out", tile=32, exports=())
    with pytest.raises(StoreError, match=r"run\.threshold.*--overwrite"):
        pipeline.segment(image, tiny_checkpoint, tmp_path / "out", tile=32, threshold=0.3, exports=())
    again = pipeline.segment(image, tiny_checkpoint, tmp_path / "out", tile=32, exports=(), overwrite=True)
    assert again == first and OutputStore.open(again).state == "complete"  # same settings: kept
    replaced = pipeline.segment(image, tiny_checkpoint, tmp_path / "out", tile=32, threshold=0.3, exports=(),
                                overwrite=True)  # fmt: skip
    assert OutputStore.open(replaced).provenance["run"]["threshold"] == 0.3


def test_an_output_lock_is_one_holders_and_dies_with_it(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from pipeline.store import StoreLock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipeline.store import StoreLock; "
        f"lock = StoreLock({str(tmp_path)!r}, 'a1'); assert lock.try_acquire(); print('held', flush=True); "
        "time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = StoreLock(tmp_path, "a1")
        assert not mine.try_acquire() and not mine.acquire(timeout=1.5)  # another process holds it
        other = StoreLock(tmp_path, "b2")
        assert other.try_acquire()  # another image's is free
        holder.send_signal(signal.SIGKILL)  # ours, by PID: a run killed any way at all
        holder.wait()
        assert mine.acquire(timeout=10)  # the kernel let go of it
        assert not StoreLock(tmp_path, "a1").try_acquire()  # and now `mine` holds it
        mine.release()
        assert StoreLock(tmp_path, "a1").try_acquire()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_store_from_before_a_pixel_setting_existed_is_the_same_output():
    """Stores written before `postprocess` and `mpp` existed lack them: they were made with
    what those settings' defaults do, so a run with the defaults resumes them."""
    from pipeline.config import RunConfig
    from pipeline.store.provenance import same_output

    now = RunConfig().to_dict()
    before = {k: v for k, v in now.items() if k not in ("postprocess", "mpp")}
    stored = {"input": {"sha256": "a"}, "model": {"sha256": "b"}, "run": before}
    assert same_output(stored, {"input": {"sha256": "a"}, "model": {"sha256": "b"}, "run": now})
    off = {**now, "postprocess": False}
    assert not same_output(stored, {"input": {"sha256": "a"}, "model": {"sha256": "b"}, "run": off})


@pytest.mark.parametrize("halve_name", ["halve_mean", "halve_nearest"])
def test_small_pyramid_levels_made_in_memory_equal_the_chunked_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     halve_name: str) -> None:
    """A level within IN_MEMORY_BYTES is halved in memory from the level just made (a
    small image's pyramid); its pixels are the chunk-by-chunk path's, odd edges included."""
    from pipeline.store import pyramid

    halve = getattr(pyramid, halve_name)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 301, 517), dtype=np.uint8)
    made = []
    for bound in (pyramid.IN_MEMORY_BYTES, 0):  # 0: every level through dask and zarr reads
        monkeypatch.setattr(pyramid, "IN_MEMORY_BYTES", bound)
        group = zarr.open_group(tmp_path / f"{bound}.zarr", mode="w", zarr_format=3)
        levels, shape = {}, (301, 517)
        for k in range(4):
            levels[str(k)] = group.create_array(str(k), shape=(3, *shape), chunks=(3, 128, 128), dtype="uint8")
            shape = ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
        levels["0"][...] = pixels
        pyramid.build_levels(levels, halve, str(tmp_path))
        made.append([np.asarray(a[...]) for a in levels.values()])
    assert made[0][3].shape == (3, 38, 65) and made[0][3].any()
    for in_memory, chunked in zip(*made, strict=True):
        np.testing.assert_array_equal(in_memory, chunked)


def test_a_small_image_has_chunks_of_its_own_size_with_the_same_keys(tmp_path: Path) -> None:
    """Chunks are clamped to the array (no padding encoded): a 256² working level at tile
    512 is one 256² prob chunk, key c/0/0/0 as before, and the store verifies."""
    from pipeline.store import verify_store

    store = _create(tmp_path / "s.zarr", full_hw=(1024, 1024), work_hw=(256, 256), tile=512, full_chunk=2048)
    assert store.prob.chunks == (1, 256, 256) and store.mask.chunks == (1024, 1024)
    (tile,) = plan_tiles((256, 256), 512)
    store.write_tile(tile, np.full((256, 256, 1), 0.75, np.float32), np.ones((1024, 1024), np.uint8),
                     Box(0, 0, 1024, 1024))  # fmt: skip
    store.set_many([TileReport(tile.index, TileStatus.DONE)])
    assert store.finalize() == "complete"
    assert (tmp_path / "s.zarr" / "prob" / "0" / "c" / "0" / "0" / "0").is_file()
    assert (tmp_path / "s.zarr" / "labels" / "mask" / "0" / "c" / "0" / "0").is_file()
    assert verify_store(OutputStore.open(tmp_path / "s.zarr")).ok
