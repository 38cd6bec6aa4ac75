"""Prefect tasks: one per stage of one image, each one `pipeline` call with paths and ids in
and summaries out (never pixels, never a tile: tiles are Ray's).

Retries: the I/O stages (discovery, ingest, export) retry with exponential backoff, but
only on errors that may pass (a network or storage hiccup): a corrupt image or a bad
setting fails the same way every time, so it fails at once.

Identifiers (invariant 8): Prefect stores a flow run's parameters, its tasks' states and
messages, and the logs sent to it. Inputs reach tasks as `Source`/`Inputs`, which
serialize without their paths; an error raised by a task that names an input's path says
the image id in its place (`keep_private`), so state messages and tracebacks carry no path.

Caching: only `input_sha256` is cached (kept across runs, keyed by the image id, the
input's size and modification marker: never its path): its result depends on nothing
else, so a nightly run does not re-read every unchanged slide to learn that it is
unchanged. Every other task writes to or reads from the output store, whose own state
decides what is left to do: caching them would skip work after an output was deleted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import progress
from flows.discover import Inputs, Source, discover, localize
from pipeline import stages
from pipeline.config import RunConfig
from pipeline.engine.pool import RunPool
from pipeline.errors import SegpipeError
from pipeline.io import location
from pipeline.io.dicomweb import is_dicomweb
from pipeline.job import ImageJob, TileReport, TileStatus
from pipeline.privacy import keep_private
from pipeline.store import OutputStore

log = logging.getLogger(__name__)
IO_RETRIES = 2
IO_BACKOFF = exponential_backoff(backoff_factor=2)  # 2 s, then 4 s
IO_JITTER = 0.5
HASH_CACHE_DAYS = 90
ARTIFACT_EVERY_S = 2.0  # the progress artifact is updated at most this often
CACHE_ENV = "SEGPIPE_CACHE"  # where remote inputs are fetched to (see _cache_dir)


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: retry anything but segpipe's own errors (bad input, bad setting,
    bad checkpoint), which would fail again the same way."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, SegpipeError)


@task(name="discover", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF,
      retry_jitter_factor=IO_JITTER, retry_condition_fn=transient, cache_policy=NO_CACHE)
def discover_task(inputs: Inputs, out: str) -> list[Source]:
    """The images of the run (folders, globs, list files, fsspec URLs)."""
    with keep_private({item: f"input {i + 1}" for i, item in enumerate(inputs.items)}):
        sources = discover(inputs.items, out)
    get_run_logger().info("%d images to consider", len(sources))
    return sources


@task(name="select", cache_policy=NO_CACHE)
def select_task(sources: list[Source], rules: tuple[str, ...]) -> dict[str, str]:
    """image id -> skip reason of each image the selection rules do not take (from header
    attributes only; the reasons quote codes such as BodyPartExamined=EXTREMITY, never an
    identifier: pipeline.selection)."""
    from flows.select import not_selected_sources
    from pipeline.selection import parse_rules

    return not_selected_sources(sources, parse_rules(rules))


def _hash_key(context: Any, parameters: Mapping[str, Any]) -> str:
    """input_sha256's cache key: the image id (a keyed hash of the input's location, never
    the location itself), its size and modification marker."""
    return f"input-sha256-{parameters['source'].image_id}-{parameters['size']}-{parameters['marker']}"


@task(name="input-sha256", cache_key_fn=_hash_key, persist_result=True,
      cache_expiration=timedelta(days=HASH_CACHE_DAYS), retries=IO_RETRIES,
      retry_delay_seconds=IO_BACKOFF, retry_condition_fn=transient)
def input_sha256(source: Source, size: int, marker: str) -> str:
    """The content hash provenance records for an input (size and marker are the cache key:
    a changed file gets a new key, so a stale hash is never reused)."""
    with keep_private(private_names(source)):
        return location.content_hash(source.uri)


@task(name="ingest", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF,
      retry_jitter_factor=IO_JITTER, retry_condition_fn=transient, cache_policy=NO_CACHE)
def ingest_task(source: Source, model_path: str, config: RunConfig, out: str) -> ImageJob:
    """Open the image, create (or reopen) its output store, bring its working level to zarr.
    A remote input is read from this machine's copy (`localize`); its working level then
    always goes into the store, so the tile workers read only the output store."""
    with keep_private(private_names(source)):
        local = localize(source, _cache_dir(out))
        fetched_from = source.uri if source.is_remote else None
        job = stages.ingest(local, model_path, config, out, source.image_id, fetched_from)
    get_run_logger().info("%s: ingested, working level %sx%s, tile %d", job.image_id,
                          *job.work_hw, job.tile)  # fmt: skip
    return job


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(job: ImageJob, config: RunConfig) -> dict[str, int]:
    """Mark background tiles skipped (slides, or with a tissue mask)."""
    with keep_private({job.input_path: job.image_id}):
        counts = stages.plan(job, config)
    get_run_logger().info("%s: %d tiles, %d skipped as background", job.image_id,
                          counts["total"], counts["skipped"])  # fmt: skip
    return counts


@task(name="infer", cache_policy=NO_CACHE)
def infer_task(job: ImageJob, config: RunConfig, pool: RunPool) -> dict[str, int]:
    """Run the image's pending and failed tiles on the run's worker pool and wait."""
    tracker = TileProgress(job)
    with keep_private({job.input_path: job.image_id}):
        counts = stages.infer(job, config, pool, tracker)
    tracker.close()
    get_run_logger().info("%s: tiles %s", job.image_id, _counts_text(counts))
    return counts


@task(name="finalize", cache_policy=NO_CACHE)
def finalize_task(job: ImageJob) -> dict[str, Any]:
    """Build the mask pyramid and write the completion state."""
    return stages.finalize(job)


@task(name="export", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF,
      retry_jitter_factor=IO_JITTER, retry_condition_fn=transient, cache_policy=NO_CACHE)
def export_task(job: ImageJob, config: RunConfig, formats: tuple[str, ...] | None = None,
                source: Source | None = None) -> dict[str, str]:
    """Write the requested exports (overlay, png, ome-tiff, dicom-seg) beside the store.
    `source`: the input of an output reused from an earlier run (DICOM SEG reads the
    study's identifiers from it; the store records no path unless --keep-paths)."""
    if source is not None and is_dicomweb(source.uri):  # read from this machine's copy (fetched if gone)
        out = job.store_path.rstrip("/").rsplit("/", 1)[0]
        with keep_private(private_names(source)):
            job = replace(job, input_path=localize(source, _cache_dir(out)))
    elif source is not None and not job.input_path:
        job = replace(job, input_path=source.uri)
    with keep_private({job.input_path: job.image_id, **(private_names(source) if source else {})}):
        written = stages.export(job, config, formats)
    if written:
        get_run_logger().info("%s: exported %s", job.image_id, ", ".join(sorted(written)))
    return written


class TileProgress:
    """The scheduler's progress callback for one image: a Prefect progress artifact
    (updated every ARTIFACT_EVERY_S at most) and events for local listeners."""

    def __init__(self, job: ImageJob):
        counts = OutputStore.open(job.store_path).counts()
        self.image_id = job.image_id
        self.total = counts["total"]
        self.settled = counts["done"] + counts["skipped"]
        self._artifact = None
        try:
            self._artifact = create_progress_artifact(
                progress=self._percent(), description=f"{job.image_id}: tiles settled (done, skipped or failed)"
            )
        except Exception as exc:  # Prefect's API, after its client's retries: the tiles matter, not the bar
            log.warning("%s: no progress artifact (%s)", job.image_id, type(exc).__name__)
        self._last = time.monotonic()
        progress.emit(progress.Event("started", self.image_id, self.settled, self.total))

    def __call__(self, report: TileReport) -> None:
        if report.status not in (TileStatus.DONE, TileStatus.FAILED):
            return
        self.settled += 1
        progress.emit(progress.Event("tiles", self.image_id, 1, self.total))
        if time.monotonic() - self._last >= ARTIFACT_EVERY_S:
            self._update()

    def close(self) -> None:
        self._update()

    def _update(self) -> None:
        self._last = time.monotonic()
        if self._artifact is None:
            return
        try:
            update_progress_artifact(self._artifact, progress=self._percent())
        except Exception as exc:  # as in __init__; and no more updates: each would wait the retries out
            log.warning("%s: progress artifact no longer updated (%s)", self.image_id, type(exc).__name__)
            self._artifact = None

    def _percent(self) -> float:
        return 100.0 * self.settled / self.total if self.total else 100.0


def private_names(source: Source) -> dict[str, str]:
    """What of a source's location an error may quote: the location and its file name (a
    DICOMweb instance's: its URI, with and without the dicomweb+ prefix, and its UID)."""
    where = source.uri.removeprefix("file://").removeprefix("dicomweb+")
    return {source.uri: source.image_id, where: source.image_id, source.name: source.image_id}


def _cache_dir(out: str) -> str:
    """Where remote inputs are fetched to: $SEGPIPE_CACHE, else <out>/.inputs beside local
    outputs, else (a remote `out`) <temp dir>/segpipe-inputs. Only this process (the
    driver) reads the copies: ingest brings a fetched input's working level into the output
    store, and DICOM SEG reads its source URL, so the cache need not be shared storage."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    if location.is_remote(out):
        return str(Path(tempfile.gettempdir()) / "segpipe-inputs")
    return str(location.local_path(out) / ".inputs")


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "pending")
