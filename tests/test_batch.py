"""The archive path: small images in batches (pipeline/batch.py, flows/batch.py).

A fixed-size model (the card's scale {"size": [32, 32]}, tile 32) plans one tile for any
image, so a collection run sends its images through batch tasks; the per-image path's
guarantees must hold there too: one bad image is one failed result, stores equal the
per-image path's bit for bit, a resumed run redoes only what is missing, and the run table,
the Prefect artifact and the run record have a row per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flows import report
from flows.discover import Source
from pipeline.config import RunConfig
from pipeline.store import OutputStore, store_path
from tests.test_flows import counting, write_png  # noqa: F401  (fixture)

TILE = 32


def _images(folder: Path, n: int) -> list[Path]:
    return [write_png(folder / f"x{i}.png", (48 + 8 * i, 64), seed=i) for i in range(n)]


def _arrays(path: str) -> dict[str, np.ndarray]:
    store = OutputStore.open(path)
    return {"mask": np.asarray(store.mask[...]), "prob": np.asarray(store.prob[...])}


# -- without Prefect or Ray ---------------------------------------------------------------------


def test_one_tile_is_known_from_the_card() -> None:
    from pipeline.batch import one_tile
    from pipeline.cards import ModelCard

    fixed = ModelCard(arch="", config={}, scale={"size": [256, 256]})
    assert one_tile(fixed, RunConfig(tile=1024))
    assert not one_tile(fixed, RunConfig(tile=128))  # 2x2 tiles: the per-image path
    assert not one_tile(ModelCard(arch="", config={}, scale={"mpp": 0.5}), RunConfig())
    assert not one_tile(ModelCard(arch="", config={}), RunConfig())


def test_a_batch_isolates_a_corrupt_image_and_equals_the_per_image_path(small_checkpoint: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    import pipeline
    from pipeline.batch import BatchItem, segment_batch
    from pipeline.engine.pool import local_pool

    images = _images(tmp_path / "in", 3)
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    config = RunConfig(tile=TILE, exports=("overlay",))
    items = [BatchItem(f"img{i}", str(p)) for i, p in enumerate([images[0], bad, *images[1:]])]
    with local_pool(str(small_checkpoint), config) as pool:
        outcomes = segment_batch(items, str(small_checkpoint), config, str(tmp_path / "batch"), pool)

    assert [o.image_id for o in outcomes] == ["img0", "img1", "img2", "img3"]
    assert [o.summary["state"] if o.summary else "failed" for o in outcomes] == ["complete", "failed",
                                                                                 "complete", "complete"]
    # its error names the image by id, never by file (invariant 8)
    assert str(outcomes[1].error).startswith("img1") and "bad.png" not in str(outcomes[1].error)
    assert outcomes[1].summary is None
    assert all(Path(o.exports["overlay"]).is_file() for o in outcomes if o.summary)
    for item in (items[0], *items[2:]):  # the per-image path, one pipeline.segment each
        alone = pipeline.segment(item.path, small_checkpoint, tmp_path / "alone", tile=TILE, exports=())
        # same name, other folder: the per-image store under the same image id
        renamed = tmp_path / "alone-by-id" / f"{item.image_id}.zarr"
        renamed.parent.mkdir(exist_ok=True)
        alone.rename(renamed)
        batch, single = _arrays(store_path(str(tmp_path / "batch"), item.image_id)), _arrays(str(renamed))
        for name in ("mask", "prob"):
            assert np.array_equal(batch[name], single[name]), f"{item.image_id}: {name} differs"


def test_a_worker_hands_back_an_image_whose_file_it_does_not_see(small_checkpoint: Path, tmp_path: Path) -> None:
    """Another node without shared storage: the path names nothing there, or another file."""
    from pipeline.batch import BatchItem
    from pipeline.engine.pool import local_pool
    from pipeline.image_stages import fingerprint, segment_in_worker

    (image,) = _images(tmp_path / "in", 1)
    config = RunConfig(tile=TILE, exports=())
    item = BatchItem("img0", str(image))
    seen = fingerprint(str(image))
    with local_pool(str(small_checkpoint), config) as pool:
        elsewhere = (seen[0] + 1, seen[1])
        assert segment_in_worker(item, elsewhere, str(small_checkpoint), config, str(tmp_path / "out"), pool) is None
        assert not (tmp_path / "out").exists()  # nothing written for an image handed back
        outcome = segment_in_worker(item, seen, str(small_checkpoint), config, str(tmp_path / "out"), pool)
    assert outcome is not None and outcome.summary["state"] == "complete"


@pytest.mark.parametrize("workers_see_inputs", [True, False])
def test_whole_images_on_the_workers_equal_the_in_process_path(ray_cluster: str, small_checkpoint: Path,
                                                               tmp_path: Path, workers_see_inputs: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Ray workers take whole images (pipeline/whole_images.py); where they cannot see the
    inputs, the driver runs them. Either way: the same stores, one bad image one failure."""
    from pipeline import whole_images
    from pipeline.batch import BatchItem, segment_batch
    from pipeline.engine.pool import local_pool
    from pipeline.workers import ray_pool

    if not workers_see_inputs:  # the driver's size for each file differs from what a worker finds
        monkeypatch.setattr(whole_images, "fingerprint", lambda path: (-1, 0))
    images = _images(tmp_path / "in", 3)
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    config = RunConfig(tile=TILE, exports=("overlay",))
    items = [BatchItem(f"img{i}", str(p)) for i, p in enumerate([images[0], bad, *images[1:]])]
    sent: list[str] = []
    real_send = whole_images._send
    monkeypatch.setattr(whole_images, "_send", lambda w, item, *a: sent.append(item.image_id) or real_send(w, item, *a))
    with ray_pool(str(small_checkpoint), config, small_images=True) as pool:
        on_ray = segment_batch(items, str(small_checkpoint), config, str(tmp_path / "ray"), pool)
    with local_pool(str(small_checkpoint), config) as pool:
        here = segment_batch(items, str(small_checkpoint), config, str(tmp_path / "here"), pool)

    if workers_see_inputs:  # every image offered to a worker, and taken
        assert sorted(sent) == sorted(i.image_id for i in items)
    else:  # each of the session's two workers handed its first image back, and got no more
        assert len(sent) == 2
    assert [o.summary["state"] if o.summary else "failed" for o in on_ray] == ["complete", "failed",
                                                                               "complete", "complete"]
    assert [o.summary is None for o in here] == [o.summary is None for o in on_ray]
    assert str(on_ray[1].error).startswith("img1") and "bad.png" not in str(on_ray[1].error)
    assert all(Path(o.exports["overlay"]).is_file() for o in on_ray if o.summary)
    for item in (items[0], *items[2:]):
        a, b = _arrays(store_path(str(tmp_path / "ray"), item.image_id)), _arrays(store_path(str(tmp_path / "here"), item.image_id))
        for name in ("mask", "prob"):
            assert np.array_equal(a[name], b[name]), f"{item.image_id}: {name} differs"
        prov = OutputStore.open(store_path(str(tmp_path / "ray"), item.image_id)).provenance
        assert prov["qc"]["verdict"] in ("pass", "flag") and str(tmp_path) not in str(prov)


@pytest.mark.slow  # workers die and restart (each loads its model again)
def test_images_of_a_worker_that_dies_midway_complete_through_the_driver(ray_cluster: str, small_checkpoint: Path,
                                                                         tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Each worker's process exits in its second image's tile (after ingest: a half-written
    store); those images come back to the driver, which resumes them on the restarted
    workers, and every store equals the in-process path's."""
    from pipeline.batch import BatchItem, segment_batch
    from pipeline.config import FaultInjection
    from pipeline.engine.pool import local_pool
    from pipeline.workers import ray_pool

    images = _images(tmp_path / "in", 4)
    items = [BatchItem(f"img{i}", str(p)) for i, p in enumerate(images)]
    dying = RunConfig(tile=TILE, exports=(), faults=FaultInjection(exit_after=1))
    with ray_pool(str(small_checkpoint), dying, small_images=True) as pool:
        outcomes = segment_batch(items, str(small_checkpoint), dying, str(tmp_path / "ray"), pool)
    with local_pool(str(small_checkpoint), RunConfig(tile=TILE, exports=())) as pool:
        segment_batch(items, str(small_checkpoint), RunConfig(tile=TILE, exports=()), str(tmp_path / "here"), pool)

    assert [o.summary["state"] if o.summary else repr(o.error) for o in outcomes] == ["complete"] * 4
    assert "its worker was lost" in caplog.text  # the deaths happened, and were ridden out
    for item in items:
        a, b = _arrays(store_path(str(tmp_path / "ray"), item.image_id)), _arrays(store_path(str(tmp_path / "here"), item.image_id))
        assert all(np.array_equal(a[k], b[k]) for k in a), item.image_id


# -- the collection flow (Prefect, Ray) ---------------------------------------------------------


def test_a_collection_batches_small_images_one_row_each(flows_env: None, small_checkpoint: Path,
                                                        tmp_path: Path, counting: dict[str, int]) -> None:  # noqa: F811
    from prefect.client.orchestration import get_client

    from flows import batch
    from flows.segment import results as run_results
    from flows.segment import segment_collection

    _images(tmp_path / "in", 4)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    out = str(tmp_path / "out")
    calls: list[int] = []
    real = batch.segment_batch

    def spy(items: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(items))
        return real(items, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "segment_batch", spy)
        state = segment_collection([str(tmp_path / "in")], str(small_checkpoint), out,
                                   RunConfig(tile=TILE, exports=()), return_state=True)  # fmt: skip
    results = run_results(state)

    assert sorted(calls) == [2, 3]  # 5 images in two batches (the run's concurrency, 2), no subflow
    ids = {p.name: Source.of(str(p), out).image_id for p in (tmp_path / "in").iterdir()}
    states = {r.image_id: r.state for r in results}
    assert states == {i: ("failed" if name == "bad.png" else "complete") for name, i in ids.items()}
    bad = next(r for r in results if r.state == "failed")
    assert bad.error.startswith(ids["bad.png"]) and "bad.png" not in bad.error and "\n" not in bad.error
    assert state.is_failed() and "1 failed of 5 images" in state.message
    # each image run once (on a worker, which takes whole images: the bad one too), one pool
    assert counting["infer"] == 5 and counting["pools"] == 1
    # each complete image carries its QC verdict, in its result and its store
    complete = [r for r in results if r.state == "complete"]
    assert all(r.qc and r.qc["verdict"] in ("pass", "flag") for r in complete)
    assert all(OutputStore.open(r.output).provenance["qc"] == r.qc for r in complete)
    # a row per image: the run record and the Prefect table artifact
    assert sorted(r.image_id for r in report.read_record(out)) == sorted(ids.values())
    with get_client(sync_client=True) as client:
        tables = [a for a in client.read_artifacts() if a.type == "table" and a.key == "segpipe-run"]
    rows = max((a.data for a in tables), key=lambda d: str(d).count("complete"))
    assert all(i in str(rows) for i in ids.values())


@pytest.mark.slow  # two collection runs
def test_a_resumed_batch_redoes_only_what_is_missing(flows_env: None, small_checkpoint: Path, tmp_path: Path,
                                                     counting: dict[str, int]) -> None:  # noqa: F811
    from flows.segment import segment_collection
    from pipeline.job import TileReport, TileStatus

    images = _images(tmp_path / "in", 3)
    out = str(tmp_path / "out")
    args = ([str(tmp_path / "in")], str(small_checkpoint), out, RunConfig(tile=TILE, exports=()))
    first = segment_collection(*args)
    assert [r.state for r in first] == ["complete"] * 3 and counting["infer"] == 3
    ids = [Source.of(str(p), out).image_id for p in images]
    kept = _arrays(store_path(out, ids[2]))

    # a batch killed part-way: one image never started, one stopped after ingest (its tile pending)
    import shutil

    shutil.rmtree(store_path(out, ids[0]))
    cut = OutputStore.open(store_path(out, ids[1]), mode="r+")
    cut.set_many([TileReport((0, 0), TileStatus.PENDING)])
    cut.mark_state("running")

    second = segment_collection(*args)
    assert {r.image_id: (r.state, r.reused) for r in second} == {
        ids[0]: ("complete", False), ids[1]: ("complete", False), ids[2]: ("complete", True)}
    assert counting["infer"] == 5  # the two unfinished images ran again, the complete one did not
    assert all(np.array_equal(a, b) for a, b in zip(kept.values(), _arrays(store_path(out, ids[2])).values(),
                                                     strict=True))  # fmt: skip
