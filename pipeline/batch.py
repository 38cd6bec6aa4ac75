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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.tiling import grid_shape
from pipeline.image_stages import BATCH_THREADS, BatchItem, BatchOutcome, segment_here

if TYPE_CHECKING:
    from pipeline.engine.pool import RunPool

log = logging.getLogger(__name__)

BATCH_IMAGES = 32  # images per batch: a Prefect task's bookkeeping spread over many images


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
