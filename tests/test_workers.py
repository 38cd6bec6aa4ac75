"""Ray execution: tiles on actors survive failing tiles, killed workers and a killed driver,
and the result equals an uninterrupted run. One 2-CPU Ray per session (conftest)."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from pipeline import stages
from pipeline.cards import ModelCard
from pipeline.cluster import Cluster, Node, worker_shape
from pipeline.config import FaultInjection, RunConfig
from pipeline.engine.scheduler import MAX_LOSSES, WorkerLost, run_tiles
from pipeline.engine.tiling import plan_tiles
from pipeline.errors import CheckpointError
from pipeline.job import ImageJob, TileReport, TileStatus
from pipeline.models import build_model, checkpoint
from pipeline.store import OutputStore
from pipeline.workers import TileWorker, local_checkpoint, ray_pool

SHAPE = (768, 1024)  # 6 x 8 = 48 tiles of 128
CONFIG = RunConfig(tile=128, precision="fp32", prob_dtype="float32", exports=(), workers=2)

# A driver in its own process, killed mid-run by the test.
DRIVER = """
import pickle, sys
from pipeline import stages
from pipeline.workers import ray_pool
job, model, config = pickle.loads(open(sys.argv[1], "rb").read())
with ray_pool(model, config) as pool:
    stages.infer(job, config, pool)
"""


def infer_ray(job, model, config, progress=None) -> dict[str, int]:
    """The infer stage on a Ray pool of its own, as a run of one image has."""
    with ray_pool(model, config) as pool:
        return stages.infer(job, config, pool, progress)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    net = build_model("unet", in_channels=3, classes=1, filters=[4, 8, 16])
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    checkpoint.save(net, ModelCard(arch="", config={}), path)
    return str(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (SHAPE[0] // 32, SHAPE[1] // 32, 3), dtype=np.uint8)
    smooth = np.asarray(PILImage.fromarray(coarse).resize(SHAPE[::-1], PILImage.BILINEAR))
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / "xray.png"
    PILImage.fromarray(noisy).save(path)
    return str(path)


@pytest.fixture(scope="module")
def clean(ray_cluster, model, image, tmp_path_factory) -> OutputStore:
    """The uninterrupted run every faulty run must equal."""
    job, _ = prepare(image, model, CONFIG, tmp_path_factory.mktemp("clean"))
    infer_ray(job, model, CONFIG)
    assert stages.finalize(job)["state"] == "complete"
    return OutputStore.open(job.store_path)


def prepare(image: str, model: str, config: RunConfig, out: Path) -> tuple[ImageJob, int]:
    job = stages.ingest(image, model, config, str(out))
    return job, stages.plan(job, config)["total"]


def assert_same(store: OutputStore, reference: OutputStore) -> None:
    assert np.array_equal(store.prob[...], reference.prob[...])
    for k in range(len(reference.layout.levels)):
        assert np.array_equal(store.mask_level(k)[...], reference.mask_level(k)[...])


def done(store: OutputStore) -> set[tuple[int, int]]:
    return {tuple(int(i) for i in rc) for rc in np.argwhere(store.status_grid() == TileStatus.DONE)}


# -- Ray: faults ------------------------------------------------------------------------


def test_tiles_failing_once_are_retried_and_the_image_equals_a_clean_run(clean, model, image, tmp_path):
    tiles = plan_tiles(SHAPE, CONFIG.tile)
    rng = np.random.default_rng(1)
    chosen = rng.choice(len(tiles), size=max(1, round(0.03 * len(tiles))), replace=False)
    faults = FaultInjection(fail_tiles=tuple(tiles[i].index for i in chosen), fail_attempts=1)
    config = CONFIG.with_(faults=faults)
    job, total = prepare(image, model, config, tmp_path)
    reports: list[TileReport] = []

    # The checkpoint as a URL: each actor copies it to a local file before loading.
    counts = infer_ray(job, f"file://{model}", config, reports.append)

    assert counts["done"] == total and not OutputStore.open(job.store_path).failures()
    assert stages.finalize(job)["state"] == "complete"
    assert_same(OutputStore.open(job.store_path), clean)


@pytest.mark.slow  # the killed actors restart: two more model loads
def test_a_killed_actor_costs_no_tile_and_counts_none_twice(clean, model, image, tmp_path, caplog):
    config = CONFIG.with_(faults=FaultInjection(exit_after=5))
    job, total = prepare(image, model, config, tmp_path)
    reports: list[TileReport] = []

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        counts = infer_ray(job, model, config, reports.append)

    assert any("worker lost" in r.getMessage() for r in caplog.records)  # it did die
    assert counts["done"] == total
    per_tile = Counter(r.index for r in reports)
    assert len(per_tile) == total and set(per_tile.values()) == {1}
    assert stages.finalize(job)["state"] == "complete"
    assert_same(OutputStore.open(job.store_path), clean)


@pytest.mark.slow  # two pools of actors start: the faulty run's and the re-run's
def test_tiles_that_always_fail_are_recorded_and_a_rerun_completes(clean, model, image, tmp_path):
    bad = ((1, 1), (4, 6))
    config = CONFIG.with_(retries=2, faults=FaultInjection(fail_tiles=bad, fail_attempts=0))
    job, total = prepare(image, model, config, tmp_path)

    counts = infer_ray(job, model, config)

    store = OutputStore.open(job.store_path)
    assert counts["failed"] == 2 and counts["done"] == total - 2
    failures = store.failures()
    assert set(failures) == set(bad)
    for index in bad:
        assert failures[index]["attempts"] == 3
        assert f"injected fault in tile {index}" in failures[index]["error"]
    assert stages.finalize(job)["state"] == "partial"

    rerun, _ = prepare(image, model, CONFIG, tmp_path)
    reports: list[TileReport] = []
    infer_ray(rerun, model, CONFIG, reports.append)

    assert sorted(r.index for r in reports) == sorted(bad)  # only what was missing
    assert stages.finalize(rerun)["state"] == "complete"
    assert_same(OutputStore.open(rerun.store_path), clean)
    # Complete: a third run starts no actor (one would die on this checkpoint).
    assert infer_ray(rerun, str(tmp_path / "absent.safetensors"), CONFIG)["done"] == total


@pytest.mark.slow  # a second driver process: python, torch and Ray start again
def test_a_killed_driver_resumes_without_recomputing_done_tiles(ray_cluster, clean, model, image, tmp_path):
    job, total = prepare(image, model, CONFIG, tmp_path)
    args = tmp_path / "args.pickle"
    args.write_bytes(pickle.dumps((job, model, CONFIG)))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(args)], env=env)
    store = OutputStore.open(job.store_path)
    try:
        while not done(store):
            assert driver.poll() is None, "the driver ended before any tile was recorded"
            time.sleep(0.02)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = done(store)
    assert 0 < len(before) < total, "the driver finished before it was killed"
    reports: list[TileReport] = []

    infer_ray(job, model, CONFIG, reports.append)

    assert not before & {r.index for r in reports}  # nothing recorded done ran again
    assert len(reports) == total - len(before)
    assert stages.finalize(job)["state"] == "complete"
    assert_same(OutputStore.open(job.store_path), clean)


# -- without Ray ---------------------------------------------------------------------


def one_node(cpus: float, gpus: float = 0.0) -> Cluster:
    return Cluster((Node("n0", cpus, gpus),))


def test_worker_shape_one_actor_per_gpu_else_cpu_actors():
    gpu = worker_shape(one_node(32, 4))
    assert (gpu.count, gpu.num_cpus, gpu.num_gpus, gpu.threads) == (4, 1, 1.0, None)
    assert worker_shape(one_node(32, 4), workers=8).num_gpus == 0.5
    cpu = worker_shape(one_node(16))
    assert (cpu.count, cpu.num_cpus, cpu.threads) == (4, 4, 4)
    assert worker_shape(one_node(6)).num_cpus == 6  # one actor of the whole node, not 4 + 2 idle
    assert (worker_shape(one_node(2), 2).threads, worker_shape(one_node(2), 2).num_cpus) == (1, 1)
    assert worker_shape(one_node(2), 4).num_cpus == 0.5  # more actors than CPUs still place
    assert worker_shape(one_node(16), 2).num_cpus == 8  # asked-for workers share the node


def test_local_checkpoint_copies_a_url_and_keeps_a_path(model):
    import fsspec

    with local_checkpoint(model) as path:
        assert path == model
    with local_checkpoint(f"file://{model}") as path:  # a local URL is its path, not a copy
        assert path == model
    url = "memory://models/tiny.safetensors"  # any fsspec URL (s3://, gs://, ...) is fetched
    with fsspec.open(url, "wb") as f:
        f.write(Path(model).read_bytes())
    with local_checkpoint(url) as path:
        assert path != model and Path(path).name == Path(model).name
        assert Path(path).read_bytes() == Path(model).read_bytes()
    assert not Path(path).exists()
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        with local_checkpoint("memory://models/missing.safetensors"):
            pass


class _Picky(Exception):
    def __init__(self, tile, why):  # two arguments: does not unpickle
        super().__init__(f"tile {tile}: {why}")


class _FailingRunner:
    def __init__(self, model_path, config):
        pass

    def run(self, job, tile, attempt):
        if tile.index == (0, 1):
            raise _Picky(tile.index, "unreadable")
        if tile.index == (1, 0):
            raise ValueError(f"tile {tile.index}: bad pixels")
        return TileReport(tile.index, TileStatus.DONE)


def test_a_worker_returns_each_tiles_outcome_in_place_of_failing_the_batch():
    worker = TileWorker("unused.safetensors", CONFIG, threads=None, runner=_FailingRunner)
    job = ImageJob("j", "", "", (32, 32), (32, 32), 16, 0)

    outcomes = worker.run(job, [(t, 1) for t in plan_tiles((32, 32), 16)])

    assert [type(o) for o in outcomes] == [TileReport, RuntimeError, ValueError, TileReport]
    assert str(outcomes[1]) == "_Picky: tile (0, 1): unreadable"  # made picklable for Ray
    assert str(outcomes[2]) == "tile (1, 0): bad pixels"


class _LosingBackend:
    """Every tile's worker dies under it."""

    slots = 1

    def __init__(self):
        self.sent: list[tuple[int, int]] = []

    def submit(self, job, tile, attempt):
        self.sent.append(tile.index)
        return len(self.sent)

    def wait(self, timeout):
        return [(len(self.sent), WorkerLost("process gone"))]


def test_a_tile_that_keeps_killing_its_worker_is_failed_not_resubmitted_forever(tmp_path):
    store = OutputStore.create_or_open(
        tmp_path / "s.zarr", image_id="s", full_hw=(32, 32), work_hw=(32, 32), tile=16,
        full_chunk=16, classes=["fg"], provenance={},
    )  # fmt: skip
    backend = _LosingBackend()

    job = ImageJob("s", str(tmp_path / "in.png"), str(tmp_path / "s.zarr"), (32, 32), (32, 32), 16, 0)
    counts = run_tiles(job, plan_tiles((32, 32), 16)[:1], backend, store, retries=3)

    assert counts["failed"] == 1 and backend.sent == [(0, 0)] * MAX_LOSSES
    assert "worker lost" in store.failures()[(0, 0)]["error"]


class _NamingBackend:
    """Workers whose errors name the input, as a reader's do: tile (0, 0) raises, tile
    (0, 1) reports its failure."""

    slots = 2

    def __init__(self, path: str):
        self.path, self.pending = path, []

    def submit(self, job, tile, attempt):
        self.pending.append(tile.index)
        return tile.index

    def wait(self, timeout):
        index = self.pending.pop(0)
        if index == (0, 0):
            return [(index, OSError(f"{self.path}: cannot decode tile at offset 4096"))]
        name = self.path.rsplit("/", 1)[-1]
        return [(index, TileReport(index, TileStatus.FAILED, error=f"{name}: bad strip", attempts=1))]


def test_a_tile_error_naming_the_input_is_stored_and_logged_with_the_image_id(tmp_path, caplog):
    path = str(tmp_path / "Doe^Jane" / "DOE_JANE_19700101.tif")
    store = OutputStore.create_or_open(
        tmp_path / "s.zarr", image_id="3f2a91c07d4e0b18", full_hw=(16, 32), work_hw=(16, 32), tile=16,
        full_chunk=16, classes=["fg"], provenance={},
    )  # fmt: skip
    job = ImageJob("3f2a91c07d4e0b18", path, str(tmp_path / "s.zarr"), (16, 32), (16, 32), 16, 0)

    with caplog.at_level(logging.INFO, logger="pipeline"):
        run_tiles(job, plan_tiles((16, 32), 16), _NamingBackend(path), store, retries=0)

    failures = store.failures()
    assert failures[(0, 0)]["error"] == "OSError: 3f2a91c07d4e0b18: cannot decode tile at offset 4096"
    assert failures[(0, 1)]["error"] == "3f2a91c07d4e0b18: bad strip"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "3f2a91c07d4e0b18" in said and "DOE" not in said and "Doe" not in said


def test_joining_a_busy_head_tries_again_when_its_client_server_did_not_start(monkeypatch, caplog):
    """A loaded head's Ray Client proxy may fail to start this driver's server in time; the
    next attempt usually succeeds. Any other failure is one ClusterError at once."""
    import importlib

    import ray

    from pipeline.errors import ClusterError

    joining = importlib.import_module("pipeline.cluster.join")  # the module; the package exports the function

    monkeypatch.setattr(joining, "_check_reachable", lambda *a: None)
    monkeypatch.setattr(joining, "_check_accepted", lambda *a: None)
    monkeypatch.setattr(joining.time, "sleep", lambda s: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    calls = []

    def init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) == 1:
            raise RuntimeError("Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.")

    monkeypatch.setattr(ray, "init", init)
    joining.join("ray://127.0.0.1:10001")
    assert calls == ["ray://127.0.0.1:10001"] * 2
    assert "trying again" in caplog.text

    def refused(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionError("token refused")

    calls.clear()
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ClusterError, match="cannot join the Ray cluster at ray://127.0.0.1:10001: .*token refused"):
        joining.join("ray://127.0.0.1:10001")
    assert len(calls) == 1
