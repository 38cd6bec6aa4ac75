"""The Prefect flows, discovery, the shared worker pool and the deployment files.

Flow tests run on one temporary Prefect server and one local Ray per session, with a
tiny untrained U-Net (its masks mean nothing; states, counts and files do)."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import pytest
import yaml

from flows import progress, report
from flows.discover import Source, discover, localize
from pipeline.config import FaultInjection, RunConfig
from pipeline.engine.pool import SharedBackend
from pipeline.engine.tiling import Tile
from pipeline.errors import InputError
from pipeline.job import TileReport, TileStatus
from pipeline.store import OutputStore

REPO = Path(__file__).resolve().parents[1]
TILE = 32


def write_png(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def write_scan(path: Path, size: tuple[int, int] = (48, 40)) -> Path:
    """A DICOM X-ray without extension, with the fixture's patient identifiers set."""
    from tests.io_fixtures import dicom_dataset, write_dicom, xray_pixels

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(path, dicom_dataset(xray_pixels(*size, 12), 12))


# -- discovery --------------------------------------------------------------------------------


def test_discover_walks_folders_sniffs_dicom_and_skips_outputs(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    write_png(root / "a" / "scan.png")
    write_png(root / "b" / "scan.png")  # same name, other folder: another output name
    write_scan(root / "c" / "IM0001")  # no extension
    (root / "c" / "notes.txt").write_text("not an image")
    (root / "c" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    write_png(root / ".cache" / "hidden.png")
    out = root / "out"
    write_png(out / "old-overlay.png")  # the output root itself is never an input

    sources = discover([str(root)], str(out))

    names = sorted(Path(s.uri).relative_to(root).as_posix() for s in sources)
    assert names == ["a/scan.png", "b/scan.png", "c/IM0001"]
    ids = [s.image_id for s in sources]
    assert len(set(ids)) == 3 and all("scan" not in i and "IM0001" not in i for i in ids)


def test_a_dicom_wsi_series_is_one_image_beside_xrays(tmp_path: Path) -> None:
    from tests.slide_fixtures import tissue_rgb, write_dicom_wsi

    root = tmp_path / "archive"
    levels = write_dicom_wsi(root / "slides", tissue_rgb(128, 160), levels=3)
    other = write_dicom_wsi(tmp_path / "second", tissue_rgb(64, 64), levels=2)
    for index, path in enumerate(other):  # a second slide's series in the same folder
        path.rename(root / "slides" / f"z-other-{index}")  # no extension: sniffed
    write_scan(root / "slides" / "chest.dcm")  # an X-ray beside them stays an image of its own

    sources = discover([str(root)], str(tmp_path / "out"))

    names = sorted(Path(s.uri).name for s in sources)
    assert names == ["chest.dcm", "level0.dcm", "z-other-0"]
    assert [s.uri for s in discover([str(levels[2])], str(tmp_path / "out"))] == [str(levels[2])]


def test_one_output_id_per_file_however_it_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = write_png(tmp_path / "in" / "sub" / "scan.png")
    (tmp_path / "link.png").symlink_to(scan)
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    named = [["in"], ["in/sub"], [str(scan)], ["in/sub/scan.png"], ["link.png"], [str(tmp_path / "in" / "*" / "*.png")]]
    ids = {s.image_id for inputs in named for s in discover(inputs, out)}
    assert len(ids) == 1


def test_discover_says_what_it_skips_without_naming_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "in"
    write_png(root / "a..b.png")  # two dots inside a name: an image like any other
    (root / "..png").write_bytes((root / "a..b.png").read_bytes())  # hidden
    (root / "._Doe_Jane.png").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble beside a copied file: hidden
    os.mkfifo(root / "Doe_Jane.png")  # reading it would block the run
    (root / "SECRET-4711.png").symlink_to(tmp_path / "gone.png")  # a link to nothing
    (root / "notes.txt").write_text("not an image, not counted")

    with caplog.at_level(logging.WARNING, logger="flows.discover"):
        sources = discover([str(root)], str(tmp_path / "out"))

    assert [Path(s.uri).name for s in sources] == ["a..b.png"]
    [said] = [r.getMessage() for r in caplog.records]
    assert said == (f"{root}: skipped 4 entries that look like images: 2 hidden (name starts with '.'), "
                    "1 links to nothing, 1 not regular files (FIFO, socket, device)")  # fmt: skip
    assert "Doe" not in said and "SECRET" not in said
    with pytest.raises(InputError, match="Doe_Jane.png: not a regular file"):  # named as an input: refused
        discover([str(root / "Doe_Jane.png")], str(tmp_path / "out"))


def test_discover_globs_list_files_and_collisions(tmp_path: Path) -> None:
    one, two = write_png(tmp_path / "x" / "scan.png"), write_png(tmp_path / "y" / "scan.png")
    listing = tmp_path / "inputs.txt"
    listing.write_text("# tonight\nx/scan.png\n\n")

    out = str(tmp_path / "out")
    assert [s.uri for s in discover([str(listing)], out)] == [str(one)]
    globbed = discover([str(tmp_path / "*" / "*.png")], out)
    assert [s.uri for s in globbed] == [str(one), str(two)]
    # two files of one name in two folders: two ids
    both = discover([str(tmp_path / "x"), str(tmp_path / "y")], out)
    assert len({s.image_id for s in both}) == 2
    # a named file is always taken, even one that will fail to open
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"garbage")
    assert [s.uri for s in discover([str(broken)], out)] == [str(broken)]
    with pytest.raises(InputError, match="no such file"):
        discover([str(tmp_path / "missing")], out)
    with pytest.raises(InputError, match="no images found"):
        discover([str(tmp_path / "x" / "*.jpg")], out)


def test_discover_fsspec_url_and_fetch(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    data = write_png(tmp_path / "scan.png").read_bytes()
    fs.pipe("/bucket/night/scan.png", data)
    fs.pipe("/bucket/night/readme.md", b"text")

    sources = discover(["memory://bucket/night"], str(tmp_path / "out"))

    assert [s.name for s in sources] == ["scan.png"]
    local = localize(sources[0], tmp_path / "cache")
    assert Path(local).read_bytes() == data
    assert Path(local).parent == tmp_path / "cache"
    fs.rm("/bucket", recursive=True)


# -- reporting ----------------------------------------------------------------------------------


def test_errors_are_one_line_naming_the_file() -> None:
    line = report.one_line_error("/data/x.dcm", RuntimeError("decoder\nexploded"))
    assert line == "/data/x.dcm: RuntimeError: decoder exploded"
    own = report.one_line_error("/data/x.dcm", InputError("/data/x.dcm: truncated"))
    assert own == "/data/x.dcm: truncated"


def test_retry_condition_skips_deterministic_errors() -> None:
    from flows.tasks import transient

    class State:
        def __init__(self, exc: BaseException):
            self.exc = exc

        def result(self, raise_on_failure: bool = True) -> BaseException:
            return self.exc

    assert transient(None, None, State(OSError("connection reset")))
    assert not transient(None, None, State(InputError("x.dcm: truncated")))


# -- the shared pool ------------------------------------------------------------------------------


class FakeBackend:
    """Finishes every tile at the next wait, DONE."""

    def __init__(self, slots: int):
        self.slots = slots
        self.pending: list[tuple[int, Tile]] = []
        self.count = 0

    def submit(self, job: Any, tile: Tile, attempt: int) -> int:
        self.count += 1
        self.pending.append((self.count, tile))
        return self.count

    def wait(self, timeout: float) -> list[tuple[int, TileReport]]:
        done, self.pending = self.pending, []
        return [(k, TileReport(t.index, TileStatus.DONE)) for k, t in done]


def test_shared_backend_routes_results_to_their_image() -> None:
    from pipeline.engine.tiling import Box

    shared = SharedBackend(FakeBackend(slots=3))
    a, b = shared.view(), shared.view()
    tile = Tile((0, 0), Box(0, 0, 1, 1), 1)
    key_a = a.submit(None, tile, 1)
    assert a.slots == 3 and b.slots == 2  # the views together never exceed the pool
    key_b = b.submit(None, Tile((0, 1), Box(0, 1, 1, 2), 1), 1)

    got_b = b.wait(timeout=0.1)
    got_a = a.wait(timeout=0.1)

    assert [k for k, _ in got_a] == [key_a] and [k for k, _ in got_b] == [key_b]
    assert got_b[0][1].index == (0, 1)


# -- the flows ----------------------------------------------------------------------------------


def test_segment_image_flow(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.discover import Source
    from flows.segment import segment_image

    image = write_png(tmp_path / "in" / "chest.png", (64, 48))
    source = Source.of(str(image), str(tmp_path / "out"))
    result = segment_image(source, str(tiny_checkpoint), str(tmp_path / "out"), RunConfig(tile=TILE))

    assert result.state == "complete" and result.size == (64, 48)
    assert result.counts["done"] == 4
    store = OutputStore.open(result.output)
    assert store.state == "complete" and store.mask.shape == (64, 48)
    assert Path(result.exports["overlay"]).is_file()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    tables = [a for a in artifacts if a.type == "table" and a.key == "segpipe-run"]
    assert any(result.image_id in str(a.data) for a in tables)  # the run's table
    assert any(a.type == "progress" and result.image_id in (a.description or "") for a in artifacts)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts images run (an infer stage here, or a whole image sent to a worker:
    pipeline/whole_images.py) and worker pools started."""
    from pipeline import stages, whole_images
    from pipeline.workers import RayBackend

    calls = {"infer": 0, "pools": 0}
    real_infer, real_start = stages.infer, RayBackend.start

    def infer(*args: Any, **kwargs: Any) -> dict[str, int]:
        calls["infer"] += 1
        return real_infer(*args, **kwargs)

    def start(*args: Any) -> Any:
        calls["pools"] += 1
        return real_start(*args)

    real_send = whole_images._send

    def send(*args: Any) -> Any:
        calls["infer"] += 1
        return real_send(*args)

    monkeypatch.setattr(stages, "infer", infer)
    monkeypatch.setattr(whole_images, "_send", send)
    monkeypatch.setattr(RayBackend, "start", start)
    return calls


@pytest.mark.slow  # three collection runs
def test_second_collection_run_does_no_inference(flows_env: None, tiny_checkpoint: Path,
                                                  tmp_path: Path, counting: dict[str, int]) -> None:
    from flows.segment import segment_collection

    for i in range(3):
        write_png(tmp_path / "in" / f"x{i}.png", seed=i)
    args = ([str(tmp_path / "in")], str(tiny_checkpoint), str(tmp_path / "out"), RunConfig(tile=TILE))

    first = segment_collection(*args)
    assert [r.state for r in first] == ["complete"] * 3 and not any(r.reused for r in first)
    assert counting == {"infer": 3, "pools": 1}  # one pool for the run, not one per image

    second = segment_collection(*args)
    assert all(r.reused and r.state == "complete" for r in second)
    assert counting == {"infer": 3, "pools": 1}  # nothing ran, no worker started

    write_png(tmp_path / "in" / "x3.png", seed=3)  # a new image arrives
    third = segment_collection(*args)
    assert [r.reused for r in third] == [True, True, True, False]
    assert counting == {"infer": 4, "pools": 2}


@pytest.mark.slow  # a collection run beside "another run" of one of its images
def test_an_image_another_run_holds_is_taken_up_last_and_not_run_twice(flows_env: None, tiny_checkpoint: Path,
                                                                       tmp_path: Path, counting: dict[str, int]) -> None:  # fmt: skip
    import threading

    import pipeline
    from flows.segment import segment_collection
    from pipeline.store import StoreLock

    images = [write_png(tmp_path / "in" / f"x{i}.png", seed=i) for i in range(3)]
    out = str(tmp_path / "out")
    ids = [Source.of(str(p), out).image_id for p in images]
    held = StoreLock(out, ids[1])
    assert held.try_acquire()  # another run (here, this thread) works on x1

    def other_run() -> None:
        try:
            deadline = time.monotonic() + 300
            while not all(_complete(out, i) for i in (ids[0], ids[2])):  # the collection ran the others first
                assert time.monotonic() < deadline
                time.sleep(0.2)
            pipeline.segment(images[1], tiny_checkpoint, out, tile=TILE, exports=())
        finally:
            held.release()

    other = threading.Thread(target=other_run)
    other.start()
    results = segment_collection([str(tmp_path / "in")], str(tiny_checkpoint), out, RunConfig(tile=TILE))
    other.join()

    assert [r.state for r in results] == ["complete"] * 3
    assert {r.image_id: r.reused for r in results} == {ids[0]: False, ids[1]: True, ids[2]: False}
    assert counting["infer"] == 3  # x0 and x2 by the collection, x1 once, by the other run
    assert Path(next(r for r in results if r.image_id == ids[1]).exports["overlay"]).is_file()  # what it lacked


def _complete(out: str, image_id: str) -> bool:
    from pipeline.store import store_path

    try:
        return OutputStore.open(store_path(out, image_id)).state == "complete"
    except Exception:  # not there yet
        return False


def test_collection_isolates_a_corrupt_image(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from flows.segment import results as run_results
    from flows.segment import segment_collection

    write_png(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    state = segment_collection([str(tmp_path / "in")], str(tiny_checkpoint), str(tmp_path / "out"),
                               RunConfig(tile=TILE), return_state=True)  # fmt: skip
    results = run_results(state)

    assert state.is_failed() and "1 failed of 2 images" in state.message  # a bad night is a Failed run

    out = str(tmp_path / "out")
    ids = {name: Source.of(str(tmp_path / "in" / name), out).image_id for name in ("bad.png", "good.png")}
    states = {r.image_id: r.state for r in results}
    assert states == {ids["bad.png"]: "failed", ids["good.png"]: "complete"}
    bad = next(r for r in results if r.state == "failed")
    # the error names the image by its id, not its path (invariant 8)
    assert "\n" not in bad.error and bad.error.startswith(ids["bad.png"]) and "bad.png" not in bad.error
    assert bad.input is None
    assert sorted(r.state for r in report.read_record(out)) == ["complete", "failed"]


def test_failed_tiles_leave_a_partial_image(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterParentFlowRunId,
    )

    from flows.segment import results, segment_collection

    write_png(tmp_path / "in" / "x.png")
    config = RunConfig(tile=TILE, retries=1, faults=FaultInjection(fail_tiles=((0, 1),)))
    state = segment_collection([str(tmp_path / "in")], str(tiny_checkpoint), str(tmp_path / "out"), config,
                               return_state=True)  # fmt: skip
    # Prefect can answer with its server's copy of a final state, which has lost the data
    # (under load, when a state proposal is retried): the results survive it
    with get_client(sync_client=True) as client:
        served = client.read_flow_run(state.state_details.flow_run_id).state
    assert served.data is None and not isinstance(served.result(raise_on_failure=False), list)
    [result] = results(served)

    # Prefect tells the truth: the partial image's run and the collection's run are Failed
    assert state.is_failed() and "1 partial" in state.message
    with get_client(sync_client=True) as client:
        [image_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[result.image_id]),
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert image_run.state.is_failed()

    assert result.state == "partial" and result.counts["failed"] == 1 and result.counts["done"] == 3
    assert result.failed_tiles[0]["tile"] == [0, 1] and result.failed_tiles[0]["attempts"] == 2
    assert "injected fault" in result.failed_tiles[0]["error"]
    assert not result.exports  # exports wait for a complete output


PATIENT_VALUES = ("Doe^Jane", "Doe", "Jane", "SECRET-4711", "19700101", "ACC-0815")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")


@pytest.fixture
def every_log_record(flows_env: None) -> Iterator[Capture]:
    """Every log record of the test, at any level, from any logger."""
    from prefect import flow

    # Prefect configures logging again (replacing root handlers) when its API app first
    # starts in this process: let that happen before the capture is attached.
    flow(lambda: None, name="warm-up")()
    capture = Capture()
    loggers = [logging.getLogger(n) for n in ("", "prefect", "pipeline", "flows")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(capture)
    yield capture
    logging.getLogger().removeHandler(capture)
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def test_no_patient_identifier_leaks(flows_env: None, tiny_checkpoint: Path, tmp_path: Path,
                                     every_log_record: Capture) -> None:
    from prefect.client.orchestration import get_client

    from flows.segment import segment_collection
    from tests.io_fixtures import PATIENT

    assert PATIENT["PatientName"] == "Doe^Jane"
    write_scan(tmp_path / "in" / "study" / "IM0001", (64, 64))
    events: list[progress.Event] = []
    out = tmp_path / "out"
    with progress.listen(events.append):
        results = segment_collection([str(tmp_path / "in")], str(tiny_checkpoint), str(out),
                                     RunConfig(tile=TILE, exports=("overlay", "png", "ome-tiff"), allow_grey=True))  # fmt: skip
    assert [r.state for r in results] == ["complete"]

    with get_client(sync_client=True) as client:
        artifacts = [f"{a.key} {a.description} {a.data}" for a in client.read_artifacts()]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "zarr.json" for p in files) and any(p.suffix == ".png" for p in files)
    texts = {
        "log records": "\n".join(every_log_record.lines),
        "artifacts": "\n".join(artifacts),
        "progress events": repr(events),
        "results": repr(results),
        "output names": "\n".join(str(p) for p in files),
    }
    assert every_log_record.lines, "no log record captured"
    assert artifacts and events
    for value in PATIENT_VALUES:
        for where, text in texts.items():
            assert value not in text, f"{value!r} leaked into {where}"
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value!r} leaked into {path}"


FILE_IDENTIFIERS = ("DOE_JOHN", "ZZPHIA4417", "19800101", "DOE_JANE_BAD")


def _prefect_records() -> dict[str, str]:
    """Everything the Prefect API holds of the runs, as text: flow runs (names,
    parameters, states), task runs, logs, artifacts, events where readable."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        texts = {
            "flow runs": "\n".join(r.model_dump_json() for r in client.read_flow_runs(limit=200)),
            "task runs": "\n".join(r.model_dump_json() for r in client.read_task_runs(limit=200)),
            "logs": "\n".join(r.model_dump_json() for r in client.read_logs(limit=200)),
            "artifacts": "\n".join(a.model_dump_json() for a in client.read_artifacts()),
        }
        try:
            events = client.request("POST", "/events/filter", json={"limit": 200})
            texts["events"] = events.text
        except Exception:  # events are kept only where the server runs its event pipeline
            pass
    return texts


def _prefect_home_bytes() -> dict[str, bytes]:
    """Every file Prefect keeps: under PREFECT_HOME (result storage) and beside its
    database (the test server's SQLite, with its journal)."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    folders = [Path(os.environ["PREFECT_HOME"])]
    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value() or "")
    if url.startswith("sqlite"):
        folders.append(Path(url.split(":///", 1)[1]).parent)
    return {str(p): p.read_bytes() for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("model", ["tiny_checkpoint", "small_checkpoint"])  # per-image subflows; batches
def test_no_identifier_in_file_or_folder_names_leaks(flows_env: None, model: str, tmp_path: Path,
                                                     every_log_record: Capture, request: pytest.FixtureRequest) -> None:
    """Invariant 8 for file and folder names: hospital exports are named after the patient."""
    from typer.testing import CliRunner

    tiny_checkpoint = request.getfixturevalue(model)

    from flows.cli import app

    folder = tmp_path / "in" / "DOE_JOHN_19800101"
    scan = write_scan(folder / "DOE_JOHN_ZZPHIA4417_19800101.dcm", (64, 64))
    (folder / "DOE_JANE_BAD_19800101.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["run", str(tmp_path / "in"), "-m", str(tiny_checkpoint), "-o", str(out), "--tile", str(TILE), "--allow-grey",
            "--export", "overlay,png,dicom-seg"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 1, done.output  # the garbage file fails, the scan completes
    again = runner.invoke(app, [*args, "--json"])  # reused: the reuse path too

    image_id = Source.of(str(scan), str(out)).image_id
    seg = out / f"{image_id}.seg.dcm"
    assert seg.is_file()  # DICOM SEG carries the study's identifiers, as the standard asks
    files = [p for p in out.rglob("*") if p.is_file() and p != seg]
    assert any(p.name == "zarr.json" for p in files) and (out / "segpipe-run.json") in files
    assert (out / ".segpipe-key").stat().st_mode & 0o777 == 0o600
    store = OutputStore.open(out / f"{image_id}.zarr")
    assert "path" not in store.provenance["input"]
    texts = {
        "console": done.output,
        "console (reused)": again.output,
        "output names": "\n".join(str(p.relative_to(tmp_path)) for p in out.rglob("*")),
        "log records": "\n".join(every_log_record.lines),
        **_prefect_records(),
    }
    assert every_log_record.lines and texts["flow runs"] and texts["task runs"] and texts["logs"]
    assert f"{image_id}: " in done.output or image_id in done.output
    for value in (*FILE_IDENTIFIERS, *PATIENT_VALUES):
        for where, text in texts.items():
            assert value not in text, f"{value!r} leaked into {where}"
        for path in files:
            assert value.encode() not in path.read_bytes(), f"{value!r} leaked into {path}"
    for value in FILE_IDENTIFIERS:
        for path, data in _prefect_home_bytes().items():
            assert value.encode() not in data, f"{value!r} leaked into Prefect's {path}"

    # --keep-paths: the path in the store's provenance and the local run record, still not in Prefect
    kept = tmp_path / "kept"
    done = runner.invoke(app, ["run", str(folder / scan.name), "-m", str(tiny_checkpoint), "-o", str(kept), "--allow-grey",
                               "--tile", str(TILE), "--export", "none", "--keep-paths"])  # fmt: skip
    assert done.exit_code == 0, done.output
    kept_id = Source.of(str(scan), str(kept)).image_id
    assert OutputStore.open(kept / f"{kept_id}.zarr").provenance["input"]["path"] == str(scan)
    assert [r.input for r in report.read_record(kept)] == [str(scan)]
    for where, text in _prefect_records().items():
        for value in FILE_IDENTIFIERS:
            assert value not in text, f"{value!r} leaked into {where} (--keep-paths)"
    for path, data in _prefect_home_bytes().items():
        for value in FILE_IDENTIFIERS:
            assert value.encode() not in data, f"{value!r} leaked into Prefect's {path} (--keep-paths)"

    # a later DICOM SEG export finds its input when given it, however it is named
    seg.unlink()
    refused = runner.invoke(app, ["export", str(out), "-f", "dicom-seg"])
    assert refused.exit_code == 1 and "--input" in refused.output
    exported = runner.invoke(app, ["export", str(out), "-f", "dicom-seg", "--input", str(scan)])
    assert exported.exit_code == 0, exported.output
    assert seg.is_file()


# -- deployment files -----------------------------------------------------------------------------


def test_prefect_yaml_names_an_existing_flow() -> None:
    import importlib

    from prefect import Flow

    spec = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "pacs-nightly"}
    for deployment in deployments.values():
        module, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(flow, Flow) and flow.name == "segment-collection"
        assert deployment["work_pool"]["name"] and deployment["concurrency_limit"] == 1
        params = flow.validate_parameters(deployment["parameters"])
        assert isinstance(params["config"], RunConfig)
    assert deployments["nightly"]["schedules"][0]["cron"] == "0 2 * * *"
    pacs = flow.validate_parameters(deployments["pacs-nightly"]["parameters"])
    assert pacs["config"].store == "dicomweb" and "dicom-seg" in pacs["config"].exports
    assert pacs["inputs"][0].startswith("dicomweb+https://")


def test_serve_builds_a_cron_deployment(tiny_checkpoint: Path) -> None:
    from flows.schedule import build_deployment

    deployment = build_deployment(["/archive"], str(tiny_checkpoint), "/results", "0 2 * * *",
                                  RunConfig(tile=512, exports=("overlay", "png")))  # fmt: skip
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *"
    assert deployment.entrypoint.endswith("flows/segment.py:segment_collection")
    assert deployment.parameters["config"] == {"tile": 512, "exports": ["overlay", "png"]}


def test_dicom_output_names_do_not_come_from_the_file_name(tmp_path: Path) -> None:
    path = write_scan(tmp_path / "IM0001")
    [source] = discover([str(path)], str(tmp_path / "out"))
    assert "IM0001" not in source.image_id and source.image_id == Source.of(str(path), str(tmp_path / "out")).image_id


@pytest.mark.slow  # the run goes on: a private embedded Prefect server and Ray start
def test_an_unreachable_prefect_api_is_one_line_and_the_run_goes_on(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    write_png(tmp_path / "in" / "x.png")
    api = "http://127.0.0.1:9/api"  # nothing listens on the discard port
    env = {**os.environ, "PREFECT_API_URL": api}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "in"), "-m", str(tiny_checkpoint),
                           "-o", str(tmp_path / "out"), "--json"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if "unreachable" in line]
    assert len(said) == 1 and api in said[0] and "the run goes on" in said[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert [r["state"] for r in json.loads(done.stdout)] == ["complete"]


@pytest.mark.slow  # a driver process started and killed
def test_runs_of_a_killed_driver_are_marked_crashed(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.settings import PREFECT_API_URL

    from flows import runs

    for i in range(3):
        write_png(tmp_path / "in" / f"x{i}.png", seed=i)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    driver = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "in"), "-m", str(tiny_checkpoint),
                               "-o", str(tmp_path / "out"), "--tile", "32"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    tag = f"{runs.TAG_PREFIX}{socket.gethostname()}:{driver.pid}"
    query = FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(r.state.is_running() for r in client.read_flow_runs(flow_run_filter=query)):
            assert driver.poll() is None, "the driver ended before its run started"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)  # ours, by PID: it cannot tell Prefect anything now
        driver.wait()
        assert any(r.state.is_running() for r in client.read_flow_runs(flow_run_filter=query))

        assert runs.mark_crashed_runs() >= 1  # what the next driver on this host does first

        left = client.read_flow_runs(flow_run_filter=query)
    assert left and not any(r.state.is_running() for r in left)
    assert any(r.state.is_crashed() and str(driver.pid) in (r.state.message or "") for r in left)


def test_pipeline_info_logs_reach_the_run_log(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A `segpipe run` driver sends the pipeline's INFO lines to Prefect with its own."""
    import subprocess
    import sys
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
    from prefect.settings import PREFECT_API_URL

    write_png(tmp_path / "in" / "x.png")
    started = time.time()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)  # the CLI's own default, as a user has it
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "in"), "-m", str(tiny_checkpoint),
                           "-o", str(tmp_path / "out"), "--tile", "32"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    logs = []
    with get_client(sync_client=True) as client:  # every page since the run started (the session's server holds many)
        since = LogFilter(timestamp=LogFilterTimestamp(after_=datetime.fromtimestamp(started, timezone.utc)))
        while page := client.read_logs(log_filter=since, limit=200, offset=len(logs)):
            logs += page
    assert any(entry.name == "pipeline.stages" and entry.level == logging.INFO and "tiles to run" in entry.message
               for entry in logs)  # fmt: skip


@pytest.mark.slow  # a driver process started and killed
def test_a_killed_driver_takes_its_prefect_server_and_ray_with_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import psutil

    for i in range(3):
        write_png(tmp_path / "in" / f"x{i}.png", seed=i)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    driver = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "in"), "-m", str(tiny_checkpoint),
                               "-o", str(tmp_path / "out"), "--tile", "32"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    parent = psutil.Process(driver.pid)

    def started() -> list[psutil.Process]:
        kids = parent.children(recursive=True)
        names = " ".join(" ".join(k.cmdline()) for k in kids if k.is_running())
        return kids if "uvicorn" in names and "raylet" in names else []

    deadline = time.monotonic() + 120
    while not (children := started()):
        assert driver.poll() is None and time.monotonic() < deadline, "the driver never started Prefect and Ray"
        time.sleep(0.2)
    time.sleep(1)  # let the reaper see them
    children = [c for c in parent.children(recursive=True) if "flows.reaper" not in " ".join(c.cmdline())]
    driver.send_signal(signal.SIGKILL)  # ours, by PID
    driver.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive if p.is_running()]
