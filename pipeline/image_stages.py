"""One small image through every stage, as a batch runs it: in the driver (`segment_here`,
a few in flight on a thread pool, tiles on the run's pool) or whole in a worker
(`segment_in_worker`, the tile on the worker's own model). Both go through `segment_one`,
so the stores are the same, bit for bit. Nothing here imports Prefect, Ray or torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from pipeline import stages
from pipeline.config import RunConfig
from pipeline.errors import portable
from pipeline.privacy import keep_private
from pipeline.store import OutputStore

if TYPE_CHECKING:
    from pipeline.engine.pool import RunPool

log = logging.getLogger(__name__)

# Images in flight at once within a batch run here: one decoding, one with its tile on the
# workers, one being finalized. More only queue on the same cores and hold more pixels.
BATCH_THREADS = 3


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch: its output name, the local file to read (a remote input's
    copy on this machine), for such a copy the URL it was fetched from, and what of its
    location no log or error may quote (`pipeline.privacy.keep_private`: name -> id)."""

    image_id: str
    path: str
    fetched_from: str | None = None
    private: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> dict[str, str]:
        """The private names, the path and its file name always among them."""
        return {self.path: self.image_id, PurePath(self.path).name: self.image_id, **self.private}


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one image: its store's summary and exports, or the error that
    stopped it (`summary` None). `seconds`: its own time, ingest to export."""

    image_id: str
    summary: dict[str, Any] | None = None
    exports: dict[str, str] = field(default_factory=dict)
    error: Exception | None = None
    seconds: float = 0.0


Fingerprint = tuple[int, int] | None  # (size, mtime_ns) of the input as the driver sees it


def fingerprint(path: str) -> Fingerprint:
    try:
        st = os.stat(path)
    except OSError:  # gone or unreadable: the worker's ingest says so, in the image's outcome
        return None
    return st.st_size, st.st_mtime_ns


def segment_in_worker(item: BatchItem, seen: Fingerprint, model_path: str, config: RunConfig,
                      out: str, pool: RunPool) -> BatchOutcome | None:  # fmt: skip
    """One whole image in a worker, its tile on the worker's own model (`pool`); None when
    the file at its path here is not the one the driver saw (`seen`)."""
    if seen is not None and fingerprint(item.path) != seen:
        return None
    outcome = segment_one(item, model_path, config, out, pool)
    return outcome if outcome.error is None else replace(outcome, error=portable(outcome.error))


def segment_here(items: Sequence[BatchItem], model_path: str, config: RunConfig, out: str,
                 pool: RunPool, *, on_done: Callable[[BatchOutcome], None] | None = None,
                 threads: int = BATCH_THREADS) -> list[BatchOutcome]:  # fmt: skip
    """Segment `items` in this process, `threads` images at once, their tiles on `pool`."""

    def one(item: BatchItem) -> BatchOutcome:
        outcome = segment_one(item, model_path, config, out, pool)
        if on_done is not None:
            on_done(outcome)
        return outcome

    if not items:
        return []
    # each thread runs in a copy of the caller's context (contextvars: log redaction, run ids)
    with ThreadPoolExecutor(max(1, min(threads, len(items))), thread_name_prefix="segpipe-batch") as ex:
        futures = [ex.submit(copy_context().run, one, item) for item in items]
        return [f.result() for f in futures]


def segment_one(item: BatchItem, model_path: str, config: RunConfig, out: str, pool: RunPool) -> BatchOutcome:
    """One image through every stage; its error, names of its input replaced by its id,
    is its outcome (this image's failure only: a batch goes on)."""
    start = time.perf_counter()
    try:
        with keep_private(item.names()):
            summary, exports = _stages(item, model_path, config, out, pool)
        return BatchOutcome(item.image_id, summary, exports, seconds=time.perf_counter() - start)
    except Exception as exc:
        log.error("%s", exc if str(exc).startswith(item.image_id) else f"{item.image_id}: {exc}")
        return BatchOutcome(item.image_id, error=exc, seconds=time.perf_counter() - start)


def _stages(item: BatchItem, model_path: str, config: RunConfig, out: str,
            pool: RunPool) -> tuple[dict[str, Any], dict[str, str]]:  # fmt: skip
    job = stages.ingest(item.path, model_path, config, out, item.image_id, item.fetched_from)
    # one handle through plan, infer and finalize: each would open the store again (zarr
    # reads of its metadata and arrays). The driver alone writes its metadata, through it.
    store = OutputStore.open(job.store_path, mode="r+")
    stages.plan(job, config, store)
    stages.infer(job, config, pool, store=store)
    summary = stages.finalize(job, store)
    exports: dict[str, str] = {}
    if summary["state"] == "complete":
        # with no export asked for (--export none), not even export's full verify: finalize
        # has just recorded every chunk's checksum
        exports = stages.export(job, config) if config.exports else {}
    else:
        log.warning("%s: %d tiles failed; exports wait for a complete output", job.image_id, summary["failed_total"])
    return summary, exports
