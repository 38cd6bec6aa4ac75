"""Object storage end to end: `segpipe run`, a re-run, `status` and `export` against a real
S3 server (moto's, on 127.0.0.1: tests/conftest.py `s3_server`), remote inputs, storage
that cannot be reached; and the export writers on memory:// URLs (fast, no server)."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import highdicom as hd
import numpy as np
import PIL.Image
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from flows.cli import app
from flows.report import read_record
from pipeline import stages
from pipeline.cards import ModelId
from pipeline.config import RunConfig
from pipeline.io.exports import (
    EXPORTS,
    export_dicom_seg,
    export_exists,
    export_location,
    export_ome_tiff,
    export_overlay,
    export_png,
)
from pipeline.job import ImageJob
from pipeline.store import OutputStore
from tests.io_fixtures import dicom_dataset, write_dicom, xray_pixels
from tests.test_cli import write_png

runner = CliRunner()
TILE = "32"
OUT = "s3://bucket/out"


def _mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 1
    mask[height // 2 :, width // 2 :] = 2
    return mask


# -- the writers on an fsspec URL (memory://) ---------------------------------------------------


@pytest.fixture
def memory() -> Iterator[Any]:
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/segpipe-test"):
        fs.rm("/segpipe-test", recursive=True)


def test_every_writer_writes_to_an_fsspec_url(memory: Any, tmp_path: Path) -> None:
    mask = _mask(48, 40)
    url = "memory://segpipe-test/out/img"
    source = write_dicom(tmp_path / "x.dcm", dicom_dataset(xray_pixels(), 12))
    memory.pipe("/segpipe-test/in/x.dcm", source.read_bytes())  # DICOM SEG reads a URL too

    written = [
        export_png(mask, f"{url}.mask.png"),
        export_overlay(np.full((48, 40), 90, np.uint8), mask, f"{url}.overlay.png"),
        export_ome_tiff([mask, mask[::2, ::2]], f"{url}.mask.ome.tif", mpp=0.5),
        export_dicom_seg("memory://segpipe-test/in/x.dcm", mask, ["lung", "heart"], f"{url}.seg.dcm",
                         ModelId("lung-xray", "0285f3c1db69")),
    ]

    assert written == [f"{url}.mask.png", f"{url}.overlay.png", f"{url}.mask.ome.tif", f"{url}.seg.dcm"]
    assert all(export_exists(w) for w in written)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(memory.cat(written[0])))), mask)
    assert np.asarray(PIL.Image.open(io.BytesIO(memory.cat(written[1])))).shape == (48, 40, 3)
    with tifffile.TiffFile(io.BytesIO(memory.cat(written[2]))) as tif:
        assert tif.is_ome and [lvl.shape for lvl in tif.series[0].levels] == [(48, 40), (24, 20)]
        np.testing.assert_array_equal(tif.asarray(), mask)
    seg = hd.seg.Segmentation.from_dataset(hd.imread(io.BytesIO(memory.cat(written[3]))))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "heart"]


def test_a_failed_export_leaves_nothing_under_its_name(memory: Any, tmp_path: Path) -> None:
    class Breaks:
        """A mask level whose second tile cannot be read."""

        shape = (1024, 1024)

        def __init__(self) -> None:
            self.reads = 0

        def __getitem__(self, index: Any) -> np.ndarray:
            self.reads += 1
            if self.reads > 1:
                raise OSError("storage went away")
            return np.zeros((512, 512), np.uint8)

    for where in (str(tmp_path / "img.mask.ome.tif"), "memory://segpipe-test/out/img.mask.ome.tif"):
        with pytest.raises(OSError, match="storage went away"):
            export_ome_tiff([Breaks()], where, mpp=None)
        assert not export_exists(where)
    assert list(tmp_path.iterdir()) == []  # nor a partial file beside it


def test_export_location_keeps_a_url_a_url() -> None:
    assert export_location("s3://b/out/img-1.zarr", ".overlay.png") == "s3://b/out/img-1.overlay.png"
    assert export_location("/data/out/img-1.zarr", ".mask.png") == "/data/out/img-1.mask.png"
    assert export_location("file:///data/out/img-1.zarr", ".mask.png") == "/data/out/img-1.mask.png"


def test_export_stage_writes_beside_a_store_on_a_url(memory: Any) -> None:
    hw = (48, 40)
    store = OutputStore.create_or_open(
        "memory://segpipe-test/out/img.zarr", image_id="img", full_hw=hw, work_hw=hw, tile=16,
        full_chunk=16, classes=["lung", "heart"],
        provenance={"input": {"sha256": "ab" * 32, "image": {"format": "png", "kind": "xray"}},
                    "model": {"sha256": "cd" * 32}, "run": {}},
    )  # fmt: skip
    store.mask[...] = _mask(*hw)
    store.write_preview(np.full((*hw, 1), 90, np.uint8))
    job = ImageJob(image_id="img", input_path="memory://segpipe-test/in/x.png", store_path=store.path,
                   full_hw=hw, work_hw=hw, tile=16, halo=0)  # fmt: skip

    planned = stages.planned_exports(job, tuple(EXPORTS))
    assert planned == {"overlay": "memory://segpipe-test/out/img.overlay.png",
                       "png": "memory://segpipe-test/out/img.mask.png",
                       "ome-tiff": "memory://segpipe-test/out/img.mask.ome.tif",
                       "tiff": "memory://segpipe-test/out/img.mask.tif",
                       "geojson": "memory://segpipe-test/out/img.geojson"}  # fmt: skip
    assert not any(export_exists(w) for w in planned.values())  # dicom-seg: not a DICOM input
    assert stages.export(job, RunConfig(), tuple(EXPORTS)) == planned
    assert all(export_exists(w) for w in planned.values())


# -- segpipe against an S3 server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> Iterator[Any]:
    """An empty bucket named 'bucket', and a client that never answers from a cached listing."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("bucket")
    yield fs
    fs.rm("bucket", recursive=True)


@pytest.fixture(scope="module")
def first_run(bucket: Any, prefect_harness: None, ray_cluster: str, tiny_checkpoint: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # fmt: skip
    """`segpipe run` of two local PNGs into s3://bucket/out: its exit code and rows."""
    inputs = tmp_path_factory.mktemp("in")
    write_png(inputs / "a.png", seed=0)
    write_png(inputs / "b.png", seed=1)
    result = runner.invoke(app, ["run", str(inputs), "-m", str(tiny_checkpoint), "-o", OUT,
                                 "--tile", TILE, "--json"])  # fmt: skip
    return {"code": result.exit_code, "output": result.output, "inputs": inputs,
            "rows": json.loads(result.stdout) if result.exit_code == 0 else []}  # fmt: skip


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts infer stages, tile runs and worker pools started."""
    from pipeline.engine import scheduler
    from pipeline.workers import RayBackend

    calls = {"infer": 0, "tiles": 0, "pools": 0}
    real = {"infer": stages.infer, "tiles": scheduler.run_tiles, "pools": RayBackend.start}

    def counted(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real[name](*args, **kwargs)

        return call

    monkeypatch.setattr(stages, "infer", counted("infer"))
    monkeypatch.setattr(scheduler, "run_tiles", counted("tiles"))
    monkeypatch.setattr(RayBackend, "start", counted("pools"))
    return calls


def _key(url: str) -> str:
    return url.removeprefix("s3://")


@pytest.mark.slow  # a collection run through the CLI, Prefect and Ray
def test_run_writes_stores_overlays_and_the_record_into_the_bucket(first_run: dict[str, Any], bucket: Any) -> None:
    assert first_run["code"] == 0, first_run["output"]
    rows = first_run["rows"]
    assert [r["state"] for r in rows] == ["complete", "complete"]
    for row in rows:
        assert row["output"] == f"{OUT}/{row['image_id']}.zarr"
        store = OutputStore.open(row["output"])
        assert store.state == "complete" and store.mask.shape == (64, 64)
        assert row["exports"] == {"overlay": f"{OUT}/{row['image_id']}.overlay.png"}
        overlay = PIL.Image.open(io.BytesIO(bucket.cat(_key(row["exports"]["overlay"]))))
        assert overlay.size == (64, 64) and overlay.mode == "RGB"
    record = json.loads(bucket.cat("bucket/out/segpipe-run.json"))
    assert record["totals"]["complete"] == 2
    assert [r.image_id for r in read_record(OUT)] == [r["image_id"] for r in rows]


@pytest.mark.slow  # two collection runs
def test_rerun_writes_a_missing_overlay_and_runs_no_tile(
    first_run: dict[str, Any], bucket: Any, tiny_checkpoint: Path, counting: dict[str, int]
) -> None:
    assert first_run["code"] == 0, first_run["output"]
    lost, kept = (r["exports"]["overlay"] for r in first_run["rows"])
    bucket.rm(_key(lost))
    kept_version = bucket.info(_key(kept))["ETag"]

    result = runner.invoke(app, ["run", str(first_run["inputs"]), "-m", str(tiny_checkpoint), "-o", OUT,
                                 "--tile", TILE, "--json"])  # fmt: skip

    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(r["reused"] and r["state"] == "complete" for r in rows)
    assert bucket.exists(_key(lost))  # written again, from the stored mask
    assert bucket.info(_key(kept))["ETag"] == kept_version
    assert counting == {"infer": 0, "tiles": 0, "pools": 0}  # no tile ran, no worker started


@pytest.mark.slow  # needs the first run
def test_status_and_export_read_an_s3_output_root(first_run: dict[str, Any], bucket: Any) -> None:
    assert first_run["code"] == 0, first_run["output"]
    ids = sorted(r["image_id"] for r in first_run["rows"])

    status = runner.invoke(app, ["status", OUT, "--json"])

    assert status.exit_code == 0, status.output
    assert sorted(s["image_id"] for s in json.loads(status.stdout)["images"]) == ids

    export = runner.invoke(app, ["export", OUT, "-f", "png"])

    assert export.exit_code == 0, export.output
    for image_id in ids:
        png = np.asarray(PIL.Image.open(io.BytesIO(bucket.cat(f"bucket/out/{image_id}.mask.png"))))
        np.testing.assert_array_equal(png, OutputStore.open(f"{OUT}/{image_id}.zarr").mask[...])
        assert f"{OUT}/{image_id}.mask.png" in export.output


@pytest.mark.slow  # a collection run through the CLI, Prefect and Ray
def test_remote_inputs_are_segmented_from_the_store_alone(bucket: Any, prefect_harness: None, ray_cluster: str,
                                                          tiny_checkpoint: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("SEGPIPE_CACHE", str(tmp_path / "cache"))
    bucket.pipe("bucket/in/x.png", write_png(tmp_path / "x.png", seed=2).read_bytes())
    pixels = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", pixels, tile=(32, 32), photometric="rgb")  # read in place when local
    bucket.pipe("bucket/in/slide.tif", (tmp_path / "slide.tif").read_bytes())
    out = "s3://bucket/remote-out"

    result = runner.invoke(app, ["run", "s3://bucket/in", "-m", str(tiny_checkpoint), "-o", out,
                                 "--tile", TILE, "--json", "--keep-paths"])  # fmt: skip

    assert result.exit_code == 0, result.output
    rows = {r["input"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"s3://bucket/in/slide.tif", "s3://bucket/in/x.png"}
    for uri, row in rows.items():
        store = OutputStore.open(row["output"])
        assert store.state == "complete"
        assert store.provenance["input"]["path"] == uri  # the URL, not this machine's copy
        # the working level is in the store: no worker read the driver's cached copy
        work = zarr.open_array(f"{row['output']}/work", mode="r")
        assert work.shape[:2] == (64, 64)
    np.testing.assert_array_equal(zarr.open_array(f"{rows['s3://bucket/in/slide.tif']['output']}/work")[...], pixels)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # fetched once each, here


# -- storage that cannot be reached ---------------------------------------------------------------


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 clients talk to a loopback port where nothing listens, trying once. Set through
    fsspec's configuration: its options are part of a client's cache key, so the clients of
    the other tests are neither reused here nor dropped."""
    from fsspec.config import conf

    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    options = {"client_kwargs": {"endpoint_url": endpoint}, "config_kwargs": {"retries": {"max_attempts": 1}}}
    monkeypatch.setitem(conf, "s3", options)


def test_unreachable_storage_is_one_line_naming_the_url(s3_server: str, nowhere: None,
                                                        tiny_checkpoint: Path, tmp_path: Path) -> None:  # fmt: skip
    image = write_png(tmp_path / "x.png")
    for args in (["status", OUT], ["export", OUT, "-f", "png"],
                 ["run", str(image), "-m", str(tiny_checkpoint), "-o", OUT]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"{OUT}: cannot access (EndpointConnectionError" in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_a_missing_bucket_is_one_line_naming_the_url(bucket: Any, tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = write_png(tmp_path / "x.png")
    status = runner.invoke(app, ["status", "s3://no-such-bucket/out"])
    assert status.exit_code == 2 and "s3://no-such-bucket/out: no such output folder" in status.output
    run = runner.invoke(app, ["run", str(image), "-m", str(tiny_checkpoint), "-o", "s3://no-such-bucket/out"])
    assert run.exit_code == 2 and "s3://no-such-bucket/out: no such bucket" in run.output
