"""Outputs are verified, not trusted (invariant 5): chunk checksums recorded at finalize,
`verify_store` naming the damaged tiles, the repair a re-run makes, `status --verify`,
`export` refusing damage; and every storage error path ending in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import pytest
import torch
from typer.testing import CliRunner

from flows import report
from flows.cli import app
from pipeline import segment
from pipeline.cards import ModelCard
from pipeline.engine import scheduler
from pipeline.engine.tiling import plan_tiles
from pipeline.job import TileReport, TileStatus
from pipeline.models import build_model, checkpoint
from pipeline.store import (
    OutputStore,
    StoreError,
    schedule_repair,
    storage_refusal,
    verify_store,
)
from pipeline.store import checksums as checks

runner = CliRunner()
TILE = 32
HW = (100, 90)  # 4 x 3 tiles of 32; full-resolution chunks are the tiles' (scale 1)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("in") / "x.png"
    yy, xx = np.mgrid[0 : HW[0], 0 : HW[1]]
    pixels = np.stack([(yy * 2) % 256, (xx * 3) % 256, ((yy + xx) * 5) % 256], -1).astype(np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, image: Path) -> Path:
    """A tiny U-Net whose output bias puts the threshold at the median probability of
    `image`: the mask has foreground and background in most chunks (an untrained net's
    probabilities all sit near 0.5, on one side or the other)."""
    torch.manual_seed(0)
    net = build_model("unet", in_channels=3, classes=1, filters=[4, 8, 16])
    folder = tmp_path_factory.mktemp("model")
    checkpoint.save(net, ModelCard(arch="", config={}), folder / "raw.safetensors")
    probe = segment(image, folder / "raw.safetensors", folder / "probe", tile=TILE, exports=(), prob_dtype="float32")
    median = float(np.median(OutputStore.open(probe).read_prob()))
    with torch.no_grad():
        net.outc.conv.bias -= float(np.log(median / (1 - median)))
    checkpoint.save(net, ModelCard(arch="", config={}), folder / "tiny.safetensors")
    return folder / "tiny.safetensors"


def run(image: Path, model: Path, out: Path) -> OutputStore:
    return OutputStore.open(segment(image, model, out, tile=TILE, exports=()))


@pytest.fixture(scope="module")
def clean(image: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> OutputStore:
    store = run(image, model, tmp_path_factory.mktemp("clean"))
    assert 0 < store.mask[...].mean() < 1, "the test model should draw foreground and background"
    return store


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The tiles the infer stage computes, in order."""
    real = scheduler.run_tiles
    tiles: list[tuple[int, int]] = []

    def counted(job: Any, todo: list[Any], *args: Any, **kwargs: Any) -> Any:
        tiles.extend(t.index for t in todo)
        return real(job, todo, *args, **kwargs)

    monkeypatch.setattr(scheduler, "run_tiles", counted)
    return tiles


def chunk(store: OutputStore, array: str, *coords: int) -> Path:
    return Path(store.path, array, "c", *map(str, coords))


def flip(path: Path) -> None:
    """Flip bytes in the middle of a chunk file: same size, other content."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    """Cut a chunk file in half: its zstd frame no longer decodes (a flip may still)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def reopen(store: OutputStore) -> OutputStore:
    """The store as it is now (an open store keeps the metadata it read)."""
    return OutputStore.open(store.path)


def assert_same(store: OutputStore, reference: OutputStore) -> None:
    assert np.array_equal(store.prob[...], reference.prob[...])
    for k in range(len(reference.layout.levels)):
        assert np.array_equal(store.mask_level(k)[...], reference.mask_level(k)[...])


# -- what finalize records, what verify finds ----------------------------------------------


def test_finalize_records_every_chunk_and_a_clean_output_verifies(clean: OutputStore) -> None:
    for name, array in clean.checked_arrays().items():
        records = clean.checksum_records(name)
        assert records is not None and records.shape == (int(np.prod(array.cdata_shape)), 3)
    for name in ("prob/0", "labels/mask/0"):  # every chunk holds data: the tests can damage any
        assert (clean.checksum_records(name)[:, checks.SIZE] > 0).all()
    for full in (True, False):
        verdict = verify_store(clean, full=full)
        assert verdict.ok and not verdict.lines() and verdict.moved == 0, verdict


def test_a_deleted_mask_chunk_names_its_tile(image: Path, model: Path, tmp_path: Path) -> None:
    store = run(image, model, tmp_path)
    chunk(store, "labels/mask/0", 1, 2).unlink()

    for full in (True, False):
        verdict = verify_store(store, full=full)
        assert verdict.damaged_tiles == [(1, 2)]
        [line] = verdict.lines()
        assert line.startswith("tile (1, 2): labels/mask/0 chunk 1/2: missing (recorded")


def test_flipped_prob_bytes_name_the_tile(image: Path, model: Path, tmp_path: Path) -> None:
    store = run(image, model, tmp_path)
    flip(chunk(store, "prob/0", 0, 2, 1))

    full = verify_store(store, full=True)
    assert full.damaged_tiles == [(2, 1)]
    assert "prob/0 chunk 0/2/1: content differs from its checksum" in full.lines()[0]
    # the reuse check reads it too: the file was written after finalize (new mtime/ctime)
    assert verify_store(store, full=False).damaged_tiles == [(2, 1)]


def test_a_copied_output_verifies_and_its_markers_are_refreshed(clean: OutputStore, tmp_path: Path) -> None:
    copy = OutputStore.open(shutil.copytree(clean.path, tmp_path / Path(clean.path).name), mode="r+")
    verdict = verify_store(copy, full=False)
    assert verdict.ok and verdict.moved > 0  # new inodes: every stored chunk's bytes were read
    copy.record_checksums()
    assert verify_store(copy, full=False).moved == 0


def test_a_failed_cell_in_a_complete_store_is_damage(image: Path, model: Path, tmp_path: Path) -> None:
    store = run(image, model, tmp_path)
    OutputStore.open(store.path, mode="r+").set_many([TileReport((0, 1), TileStatus.FAILED, error="lost")])
    assert store.state == "complete"

    verdict = verify_store(store, full=False)
    assert verdict.damaged_tiles == [(0, 1)]
    assert verdict.lines() == ["tile (0, 1): FAILED in an output marked complete"]


def test_a_store_being_written_is_not_checked(image: Path, model: Path, tmp_path: Path) -> None:
    store = OutputStore.open(run(image, model, tmp_path).path, mode="r+")
    store.mark_state("running")
    verdict = verify_store(store)
    assert verdict.ok and verdict.not_checked == "not checked: running"


# -- repair ----------------------------------------------------------------------------------


def test_a_rerun_recomputes_only_the_damaged_tiles_to_the_clean_arrays(
    image: Path, model: Path, clean: OutputStore, tmp_path: Path, computed: list[tuple[int, int]]
) -> None:
    store = run(image, model, tmp_path)
    computed.clear()
    chunk(store, "labels/mask/0", 3, 0).unlink()
    flip(chunk(store, "prob/0", 0, 0, 2))
    OutputStore.open(store.path, mode="r+").set_many([TileReport((1, 1), TileStatus.FAILED, error="lost")])

    # what the collection flow does before reusing an output (flows/reuse.py `intact`)
    verdict = verify_store(store, full=False)
    assert schedule_repair(OutputStore.open(store.path, mode="r+"), verdict) == [(0, 2), (3, 0)]
    assert reopen(store).state == "partial" and len(reopen(store).summary()["damage"]) == 3
    run(image, model, tmp_path)

    assert sorted(computed) == [(0, 2), (1, 1), (3, 0)]
    repaired = reopen(store)
    assert repaired.state == "complete" and "damage" not in repaired._meta()
    assert verify_store(repaired).ok
    assert_same(repaired, clean)


def test_rerunning_a_damaged_complete_store_in_process_repairs_it(
    image: Path, model: Path, clean: OutputStore, tmp_path: Path, computed: list[tuple[int, int]]
) -> None:
    """`pipeline.segment` has no reuse check: its finalize verifies a store that infer left
    alone (never re-records it), marks the damage, and the next call repairs it."""
    store = run(image, model, tmp_path)
    chunk(store, "prob/0", 0, 1, 0).unlink()
    computed.clear()

    run(image, model, tmp_path)
    assert computed == [] and reopen(store).state == "partial"
    run(image, model, tmp_path)

    assert computed == [(1, 0)]
    assert reopen(store).state == "complete" and verify_store(reopen(store)).ok
    assert_same(store, clean)


def test_pyramid_damage_is_repaired_by_finalize_without_a_tile(
    model: Path, tmp_path: Path, computed: list[tuple[int, int]]
) -> None:
    tall = tmp_path / "tall.png"
    pixels = np.random.default_rng(1).integers(0, 255, (1100, 40, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tall)
    store = run(tall, model, tmp_path / "out")
    assert len(store.layout.levels) == 2
    reference = {k: store.mask_level(k)[...] for k in range(2)}
    stored = sorted(p for p in Path(store.path, "labels/mask/1/c").rglob("*") if p.is_file())
    stored[0].unlink()
    computed.clear()

    verdict = verify_store(store, full=False)
    assert not verdict.ok and verdict.damaged_tiles == []
    assert verdict.lines()[0].startswith("labels/mask/1 chunk ")
    assert schedule_repair(OutputStore.open(store.path, mode="r+"), verdict) == []
    run(tall, model, tmp_path / "out")

    assert computed == [] and reopen(store).state == "complete" and verify_store(reopen(store)).ok
    for k in range(2):
        assert np.array_equal(store.mask_level(k)[...], reference[k])


def test_a_chunk_found_in_a_skipped_tile_is_removed(image: Path, model: Path, tmp_path: Path) -> None:
    store = OutputStore.open(run(image, model, tmp_path).path, mode="r+")
    store.set_many([TileReport((3, 2), TileStatus.SKIPPED)])
    chunk(store, "prob/0", 0, 3, 2).unlink()
    chunk(store, "labels/mask/0", 3, 2).unlink()
    store.finalize()  # the tile is skipped: no chunk of it is stored
    assert verify_store(store).ok
    store.prob[:, 96:100, 64:90] = 7  # a stray write

    verdict = verify_store(store)
    assert verdict.damaged_tiles == [(3, 2)] and "where none was written" in verdict.lines()[0]
    assert schedule_repair(store, verdict) == []  # nothing to compute: the chunk goes
    assert not chunk(store, "prob/0", 0, 3, 2).exists()
    assert store.finalize() == "complete" and verify_store(store).ok


def finished_store(url: str) -> OutputStore:
    """A small complete store at `url`, its tiles written through the store API."""
    store = OutputStore.create_or_open(
        url, image_id="img", full_hw=(48, 40), work_hw=(48, 40), tile=16, full_chunk=16,
        classes=["lung"], provenance={"input": {"sha256": "ab" * 32}, "model": {"sha256": "cd" * 32}, "run": {}},
    )  # fmt: skip
    yy, xx = np.mgrid[0:48, 0:40]
    prob = (((yy + xx) % 7) / 7.0)[..., None].astype(np.float32)
    mask = ((yy + xx) % 3 == 0).astype(np.uint8)
    for tile in plan_tiles((48, 40), 16):
        work, full = store.owned_boxes(tile)
        store.write_tile(tile, prob[work.slices()], mask[full.slices()], full)
    store.set_many([TileReport(t.index, TileStatus.DONE) for t in plan_tiles((48, 40), 16)])
    assert store.finalize() == "complete"
    return store


@pytest.fixture
def s3(s3_server: str) -> Iterator[Any]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("verify-bucket")
    yield fs
    fs.rm("verify-bucket", recursive=True)


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_an_fsspec_store_verifies_through_its_listing(where: str, request: pytest.FixtureRequest) -> None:
    if where == "s3":
        fs, root = request.getfixturevalue("s3"), "verify-bucket/out"
    else:
        fs, root = fsspec.filesystem("memory"), "/segpipe-verify/out"
    try:
        store = finished_store(f"{where}://{root.strip('/')}/img.zarr")
        clean = verify_store(store, full=False)
        assert clean.ok and clean.moved == 0  # ETags (or creation times) as recorded: no byte read
        assert verify_store(store).ok

        fs.rm(f"{root}/img.zarr/labels/mask/0/c/2/1")
        data = bytearray(fs.cat(f"{root}/img.zarr/prob/0/c/0/0/1"))
        data[len(data) // 2] ^= 0xFF
        fs.pipe(f"{root}/img.zarr/prob/0/c/0/0/1", bytes(data))

        assert verify_store(store, full=False).damaged_tiles == [(0, 1), (2, 1)]
        assert verify_store(store, full=True).damaged_tiles == [(0, 1), (2, 1)]
    finally:
        if where == "memory" and fs.exists(root):
            fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_a_chunk_that_does_not_decode_is_one_store_error_naming_it(image: Path, model: Path, tmp_path: Path) -> None:
    store = run(image, model, tmp_path)
    truncate(chunk(store, "prob/0", 0, 2, 1))
    truncate(chunk(store, "labels/mask/0", 0, 0))

    with pytest.raises(StoreError, match=r"[0-9a-f]{16}\.zarr: prob/0 chunk c/0/2/1 cannot be decoded"):
        store.read_prob()
    summary = store.summary()  # a status listing goes on, naming the damage
    assert summary["mask_fraction"] is None
    assert "labels/mask/0 chunk c/0/0 cannot be decoded" in summary["damage"][0]


# -- the command line ------------------------------------------------------------------------


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_status_verify_reports_damage_exits_1_and_marks_it_for_the_next_run(
    image: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = run(image, model, tmp_path)
    chunk(store, "labels/mask/0", 2, 2).unlink()
    # without --verify only metadata is read: status stays fast, and says complete
    with monkeypatch.context() as m:
        m.setattr(checks, "read_many", lambda *a, **k: pytest.fail("status read chunk bytes"))
        m.setattr(checks, "listing", lambda *a, **k: pytest.fail("status listed chunks"))
        assert runner.invoke(app, ["status", str(tmp_path)]).exit_code == 0

    verified = runner.invoke(app, ["status", str(tmp_path), "--verify"])

    assert verified.exit_code == 1, verified.output
    assert f"{store.image_id} damaged: tile (2, 2): labels/mask/0 chunk 2/2: missing" in verified.output
    assert reopen(store).state == "partial" and reopen(store).counts()["pending"] == 1
    as_json = json.loads(runner.invoke(app, ["status", str(tmp_path), "--json"]).stdout)
    assert as_json["images"][0]["damage"] and as_json["images"][0]["state"] == "partial"


def test_export_refuses_a_damaged_store_on_one_line(image: Path, model: Path, tmp_path: Path) -> None:
    store = run(image, model, tmp_path)
    flip(chunk(store, "prob/0", 0, 0, 0))

    result = runner.invoke(app, ["export", str(tmp_path), "-f", "png"])

    assert result.exit_code == 1
    line = one_line(result.output)
    assert line.startswith(f"✗ {store.image_id}: not exported, damaged: tile (0, 0): prob/0 chunk 0/0/0: ")
    assert line.endswith("; the next run repairs it")
    assert not list(tmp_path.glob("*.png"))


def test_an_unreadable_run_record_is_a_warning_line(image: Path, model: Path, tmp_path: Path) -> None:
    run(image, model, tmp_path)
    record = tmp_path / report.RUN_RECORD
    for garbage in ("", '{"images": [{"input": "x"'):
        record.write_text(garbage)
        result = runner.invoke(app, ["status", str(tmp_path)])
        assert result.exit_code == 0, result.output
        [warning] = [ln for ln in result.output.splitlines() if "warning" in ln]
        assert f"{record}: the last run's record is unreadable, ignored (JSONDecodeError" in warning


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_out_naming_a_file_is_one_line_and_exit_2(where: str, image: Path, model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "out"

    result = runner.invoke(app, ["run", str(image), "-m", str(model), "-o", str(out)])

    assert result.exit_code == 2
    line = one_line(result.output)
    assert f"{out}: {'it' if where == 'file' else blocker} is a file, not an output folder" in line
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing created


def test_a_full_disk_keeps_the_last_run_record_and_says_so_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = [report.ImageResult("in/a.png", "a", "complete")]
    where = report.write_record(str(tmp_path), first)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        real_fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where + ".part")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError) as caught:
        report.write_record(str(tmp_path), first * 2)
    assert f"{where}: cannot write the run record" in str(caught.value) and "(ENOSPC)" in str(caught.value)
    assert [r.image_id for r in report.read_record(tmp_path)] == ["a"]  # the last record, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [report.RUN_RECORD]  # no temporary left


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left on the device (ENOSPC)"),
                                             (errno.EROFS, "read-only file system (EROFS)"),
                                             (errno.EACCES, "permission denied (EACCES)")])  # fmt: skip
def test_storage_refusals_are_one_line_naming_the_path(code: int, words: str) -> None:
    exc = OSError(code, os.strerror(code), "/out/x.zarr/prob/c/0/0/0")
    assert str(storage_refusal(exc)) == f"/out/x.zarr/prob/c/0/0/0: {words}"
    line = report.failed("3f2a91c07d4e0b18", exc).error
    assert line == f"3f2a91c07d4e0b18: /out/x.zarr/prob/c/0/0/0: {words}"
    assert storage_refusal(OSError(errno.EIO, "io")) is None


# -- end to end, through Prefect and Ray -------------------------------------------------------


@pytest.mark.slow  # three collection runs through the CLI
def test_a_rerun_repairs_a_damaged_output_and_reuses_an_intact_one(
    flows_env: None, image: Path, model: Path, clean: OutputStore, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(image, inputs / "x.png")
    shutil.copy(image, inputs / "y.png")
    out = tmp_path / "out"
    args = ["run", str(inputs), "-m", str(model), "-o", str(out), "--tile", str(TILE), "--export", "none", "--json"]
    assert runner.invoke(app, args).exit_code == 0
    x, y = (OutputStore.open(p) for p in sorted(out.glob("*.zarr")))
    chunk(x, "labels/mask/0", 1, 1).unlink()

    rows = {r["image_id"]: r for r in json.loads(runner.invoke(app, args).stdout)}

    assert rows[y.image_id]["reused"] and not rows[x.image_id]["reused"]
    assert rows[x.image_id]["state"] == "complete"
    assert x.state == "complete" and verify_store(x).ok
    assert_same(x, clean)


@pytest.mark.slow  # a collection run through the CLI
def test_a_full_disk_during_a_run_is_one_line_per_image(
    flows_env: None, image: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zarr.storage import LocalStore

    async def full(self: Any, key: str, value: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(str(self.root), key))

    monkeypatch.setattr(LocalStore, "set", full)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(image), "-m", str(model), "-o", str(out), "--tile", str(TILE),
                                 "--keep-paths"])  # the console then names the file too  # fmt: skip

    # (Prefect's own task logs reach the console here: a test process imported Prefect
    # before the CLI could quiet them; `segpipe run` shows them only with --verbose)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    [line] = [ln for ln in result.output.splitlines() if "✗" in ln]
    assert "no space left on the device (ENOSPC)" in line and str(image) in line
