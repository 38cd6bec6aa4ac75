"""Many small images in one call: the archive path (an X-ray archive is 100,000 images of
one tile each, where per-image bookkeeping, not the model, sets the pace).

`segment_batch` takes images whose plan is one tile at the working level (`one_tile`:
every image through a fixed-size model such as lung-xray) and runs each through the same
stages as `pipeline.segment` and the per-image flow (ingest → plan → infer → finalize →
export), so a batch's stores are the per-image path's, bit for bit. What it saves is
around the stages: one call (one Prefect task) for the whole batch instead of a subflow and
five tasks per image, and, where they run in this process, a few images in flight at once
on a small thread pool, so that one image decodes and another's store is written while the
pool's workers run a third's tile.

Where the images run: on the run's workers when the pool offers them
(`pipeline.whole_images`: each worker ingests, infers and finalizes whole images with the
model it holds, so the driver only hands out paths and collects summaries and a batch runs
as fast as the workers, not as one driver process's GIL allows), else in this process.
An image a worker cannot see (another node, no shared storage) or whose worker died comes
back here and runs through the tile path.

Failure isolation: each image's error is caught and handed back as its outcome; the
others of the batch go on. Nothing here imports Prefect, Ray or torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from pipeline import stages
from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.tiling import grid_shape
from pipeline.privacy import keep_private
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
    error: BaseException | None = None
    seconds: float = 0.0


def one_tile(card: ModelCard, config: RunConfig) -> bool:
    """Whether every image through this model plans one tile at the working level,
    whatever its size: a fixed-size model's working level is the card's size, so this
    is known from the card alone, before any input is opened."""
    size = (card.scale or {}).get("size")
    return size is not None and grid_shape(tuple(size), config.tile) == (1, 1)


def segment_batch(items: Sequence[BatchItem], model_path: str, config: RunConfig, out: str,
                  pool: RunPool, *, on_done: Callable[[BatchOutcome], None] | None = None,
                  threads: int = BATCH_THREADS) -> list[BatchOutcome]:  # fmt: skip
    """Segment `items` into `out`, on the workers of the run's `pool` where it offers them
    (see the module's text), else here; one outcome per item, in order. `on_done` hears each
    outcome as it comes (progress)."""
    if not items:
        return []
    if pool.image_workers() is None:  # (waits for the first worker to be up)
        return segment_here(items, model_path, config, out, pool, on_done=on_done, threads=threads)
    # Ray only where the workers are Ray actors
    from pipeline.whole_images import on_workers

    return on_workers(items, model_path, config, out, pool, on_done=on_done)


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
