"""Many small images in one call: the archive path (an X-ray archive is 100,000 images of
one tile each, where per-image bookkeeping, not the model, sets the pace).

`segment_batch` takes images whose plan is one tile at the working level (`one_tile`:
every image through a fixed-size model such as lung-xray) and runs each through the same
stages as `pipeline.segment` and the per-image flow (ingest → plan → infer → finalize →
export), so a batch's stores are the per-image path's, bit for bit. What it saves is
around the stages: one call (one Prefect task) for the whole batch instead of a subflow and
five tasks per image, and a few images in flight at once on a small thread pool, so that
one image decodes and another's store is written while the pool's workers run a third's
tile.

Failure isolation: each image's error is caught and handed back as its outcome; the
others of the batch go on. Nothing here imports Prefect or torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from contextvars import copy_context
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline import stages
from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.tiling import grid_shape
from pipeline.store import OutputStore

if TYPE_CHECKING:
    from pipeline.engine.pool import RunPool

log = logging.getLogger(__name__)

BATCH_IMAGES = 32  # images per batch: a Prefect task's bookkeeping spread over many images
# Images in flight at once within a batch: one decoding, one with its tile on the workers,
# one being finalized. More only queue on the same cores and hold more decoded pixels.
BATCH_THREADS = 3


@dataclass(frozen=True)
class BatchItem:
    """One image of a batch: its output name, the local file to read (a remote input's
    copy on this machine) and, for such a copy, the URL it was fetched from."""

    image_id: str
    path: str
    fetched_from: str | None = None


@dataclass(frozen=True)
class BatchOutcome:
    """What became of one image: its store's summary and exports, or the error that
    stopped it (`summary` None). `seconds`: its own time, ingest to export."""

    image_id: str
    summary: dict[str, Any] | None = None
    exports: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None
    seconds: float = 0.0


def one_tile(card: ModelCard, config: RunConfig) -> bool:
    """Whether every image through this model plans one tile at the working level,
    whatever its size: a fixed-size model's working level is the card's size, so this
    is known from the card alone, before any input is opened."""
    size = (card.scale or {}).get("size")
    return size is not None and grid_shape(tuple(size), config.tile) == (1, 1)


Guard = Callable[[BatchItem], AbstractContextManager[Any]]


def segment_batch(items: Sequence[BatchItem], model_path: str, config: RunConfig, out: str,
                  pool: RunPool, *, guard: Guard | None = None,
                  on_done: Callable[[BatchOutcome], None] | None = None,
                  threads: int = BATCH_THREADS) -> list[BatchOutcome]:  # fmt: skip
    """Segment `items` into `out` on the run's worker `pool`; one outcome per item, in
    order. `guard(item)` is entered around each image's work in its thread (the flows
    keep input paths out of errors and logs with it); `on_done` hears each outcome as it
    comes (progress)."""
    guard = guard or (lambda item: nullcontext())

    def one(item: BatchItem) -> BatchOutcome:
        start = time.perf_counter()
        try:
            with guard(item):
                summary, exports = _stages(item, model_path, config, out, pool)
            outcome = BatchOutcome(item.image_id, summary, exports, seconds=time.perf_counter() - start)
        except Exception as exc:  # this image's failure only: the batch goes on
            log.error("%s: %s", item.image_id, exc)
            outcome = BatchOutcome(item.image_id, error=exc, seconds=time.perf_counter() - start)
        if on_done is not None:
            on_done(outcome)
        return outcome

    if not items:
        return []
    # each thread runs in a copy of the caller's context (contextvars: log redaction, run ids)
    with ThreadPoolExecutor(max(1, min(threads, len(items))), thread_name_prefix="segpipe-batch") as ex:
        futures = [ex.submit(copy_context().run, one, item) for item in items]
        return [f.result() for f in futures]


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
