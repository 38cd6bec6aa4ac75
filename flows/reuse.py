"""Reuse of finished outputs: which of a run's images are already complete for the same
input content, model and settings (and intact), so that no tile runs for them again; such
an output only gets the exports it lacks."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture

from flows import pacs, progress, report
from flows.discover import Source, fingerprint
from flows.outputs import job_for
from flows.report import ImageResult
from flows.tasks import export_task, input_sha256
from pipeline import stages
from pipeline.config import RunConfig
from pipeline.io.dicomweb import is_dicomweb
from pipeline.io.exports import export_exists
from pipeline.store import (
    OutputStore,
    StoreError,
    Verdict,
    same_output,
    schedule_repair,
    store_path,
    verify_store,
)


def reusable(sources: list[Source], out: str, wanted: dict[str, Any],
              config: RunConfig) -> dict[str, ImageResult]:  # fmt: skip
    """Sources whose output is complete for this model and these settings, whose content
    hash (cached across runs by size and modification marker) is the one recorded and whose
    chunks pass the reuse check (`intact`). Such an output gets the exports the run asks
    for that it lacks (no tile runs: only the export task). An output that cannot be
    checked is a failed result: running it would re-finalize what was not verified.
    A DICOMweb instance is not hashed (that would fetch it): its id is a keyed hash of its
    UIDs, and a SOP Instance UID names one content (PS3.3 C.12.1.1.1)."""
    candidates: dict[str, tuple[OutputStore, str | None, PrefectFuture]] = {}
    matching: dict[str, OutputStore] = {}
    for source in sources:
        store = complete_store(out, source.image_id)
        if store is None:
            continue
        stored = store.provenance
        recorded = stored.get("input", {})
        # model and settings first: the input is hashed only when they match
        if not same_output(stored, {**wanted, "input": recorded}):
            continue
        if is_dicomweb(source.uri):
            matching[source.image_id] = store
            continue
        try:
            key = fingerprint(source)
        except Exception:  # gone or unreachable since discovery: the image's own run reports it
            continue
        candidates[source.image_id] = (store, recorded.get("sha256"), input_sha256.submit(source, *key))
    matching |= {image_id: store for image_id, (store, recorded_sha, digest) in candidates.items()
                 if digest.result(raise_on_failure=False) == recorded_sha}  # fmt: skip
    by_id = {s.image_id: s for s in sources}
    checked, reused = intact(matching)
    exporting: dict[str, tuple[OutputStore, dict[str, str], PrefectFuture | None]] = {}
    for image_id, store in checked.items():
        job = job_for(store)
        planned = stages.planned_exports(job, config.exports)
        missing = tuple(name for name, where in planned.items() if not export_exists(where))
        writing = export_task.submit(job, config, missing, by_id[image_id]) if missing else None
        exporting[image_id] = (store, planned, writing)
    for image_id, (store, planned, writing) in exporting.items():
        failure = writing.result(raise_on_failure=False) if writing is not None else None
        if isinstance(failure, BaseException):
            reused[image_id] = report.failed(store.image_id, failure)
            get_run_logger().error(reused[image_id].error)
        else:
            reused[image_id] = report.from_summary(store.summary(), 0.0, planned, reused=True)
    reused = {r.image_id: r for r in pacs.stored(list(reused.values()), by_id, config)}  # --store: SEGs not yet sent
    for image_id in exporting:  # those that intact failed were reported there
        state = "reused" if reused[image_id].ok else reused[image_id].state
        progress.emit(progress.Event("finished", image_id, state=state))
    return reused


def complete_store(out: str, image_id: str) -> OutputStore | None:
    """The image's store when it is marked complete in the current store format (metadata
    only: its chunks are checked by `intact` once its input and settings match, its
    exports by `reusable`); an older format's output runs again (ingest remakes it)."""
    try:
        store = OutputStore.open(store_path(out, image_id))
    except StoreError:  # none, or damaged metadata: the image's own run says which
        return None
    return store if store.state == "complete" and not store.outdated else None


VERIFY_THREADS = 8  # stores checked at once before reuse: the checks wait on storage


def intact(stores: dict[str, OutputStore]) -> tuple[dict[str, OutputStore], dict[str, ImageResult]]:
    """(stores that pass the reuse check, failed results of those that cannot be checked).

    The reuse check is pipeline/store/verify.py's cheap one (full=False): every chunk
    present or absent as finalize recorded it, with its recorded size; bytes are read only
    of chunks written since (new mtime/ctime/inode or ETag). A damaged store is set to be
    repaired (its damaged tiles PENDING, state partial) and left to run: the infer stage
    recomputes exactly those tiles and finalize rebuilds the pyramid. The full check (every
    chunk's bytes) is `segpipe status --verify`'s and `segpipe export`'s."""
    from concurrent.futures import ThreadPoolExecutor

    logger = get_run_logger()
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        verdicts = dict(zip(stores, pool.map(_cheap_verdict, stores.values()), strict=True))
    intact, failed = {}, {}
    for image_id, found in verdicts.items():
        store = stores[image_id]
        try:
            if isinstance(found, Exception):
                raise found
            if found.ok:
                if found.moved:  # copied or restored, same bytes: next time, read nothing
                    OutputStore.open(store.path, mode="r+").record_checksums()
                intact[image_id] = store
                continue
            tiles = schedule_repair(OutputStore.open(store.path, mode="r+"), found)
            logger.warning("%s; %d tiles run again", found.summary(), len(tiles))
        except (StoreError, OSError) as exc:
            failed[image_id] = report.failed(store.image_id, exc)
            logger.error(failed[image_id].error)
            progress.emit(progress.Event("finished", store.image_id, state="failed"))
    return intact, failed


def _cheap_verdict(store: OutputStore) -> Verdict | Exception:
    try:
        return verify_store(store, full=False)
    except (StoreError, OSError) as exc:  # in a worker thread: handed to the flow's thread
        return exc
