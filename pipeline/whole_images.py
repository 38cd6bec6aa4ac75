"""Whole small images on the workers: the archive path's division of labour.

An X-ray archive is 100,000 images of one tile each. Run by the driver (ingest, then the
tile on a worker, then finalize), each image costs the driver's one process twice what the
tile costs its worker: the driver's GIL, not the model, set the pace, and more workers did
not help. Here each worker takes whole images instead: it ingests, runs the tile on the
model it already holds, finalizes and exports, through the same stages as every other path
(`image_stages.segment_one`; the worker's side is `image_stages.segment_in_worker`), so its stores are the same, bit for bit. The driver hands
out paths and collects summaries: a batch runs as fast as the workers, and scales with
them.

A worker reads the input from the path the driver found it at. On a worker of another
node the path may not exist, or name another file: the driver sends the file's size and
modification time, and a worker that finds something else there hands the image back
(None) and gets no more images of this batch. Images handed back, and those of a worker
that died mid-image, run in the driver (`segment_here`: the tile path, with its retries);
a half-written store is resumed there like any other.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.exceptions as rx

from pipeline.config import RunConfig
from pipeline.engine.pool import RunPool
from pipeline.image_stages import BatchItem, BatchOutcome, fingerprint, segment_here
from pipeline.privacy import keep_private
from pipeline.workers import LOST_ERRORS, actor_id

log = logging.getLogger(__name__)

# Images in flight on one worker: one computing while the other reads or writes its store
# (the actor runs two calls at once); more would only queue there, holding decoded pixels.
IMAGES_PER_WORKER = 2

def on_workers(items: Sequence[BatchItem], model_path: str, config: RunConfig, out: str, pool: RunPool, *,
               on_done: Callable[[BatchOutcome], None] | None = None) -> list[BatchOutcome]:  # fmt: skip
    """Segment `items` on the pool's workers (TileWorker actors), IMAGES_PER_WORKER at a
    time on each that is up (asked again before each round: workers start at their own
    pace); one outcome per item, in order. What no worker could do runs here, on `pool`."""
    outcomes: dict[int, BatchOutcome] = {}
    queue, here = deque(range(len(items))), []
    load: dict[str, int] = {}  # actor id -> images in flight on it
    blind: set[str] = set()  # workers that cannot see the inputs, or died: none of this batch
    calls: dict[Any, tuple[int, str]] = {}  # ObjectRef -> item, actor id
    while queue or calls:
        workers = {actor_id(h): h for h in pool.image_workers(wait=False) or []}
        for w in sorted(workers.keys() - blind, key=lambda w: load.get(w, 0)):
            while queue and load.get(w, 0) < IMAGES_PER_WORKER:
                i = queue.popleft()
                calls[_send(workers[w], items[i], model_path, config, out)] = (i, w)
                load[w] = load.get(w, 0) + 1
        if not calls:  # no worker left that can take them: the rest runs here
            here += queue
            break
        (ref,), _ = ray.wait(list(calls), num_returns=1)
        i, w = calls.pop(ref)
        load[w] -= 1
        try:
            outcome = ray.get(ref)
        except LOST_ERRORS as exc:
            log.warning("%s: its worker was lost (%s); running it here", items[i].image_id, type(exc).__name__)
            blind.add(w)
            here.append(i)
            continue
        except rx.RayError as exc:  # the call itself broke (e.g. its arguments did not unpickle)
            outcome = BatchOutcome(items[i].image_id, error=_private(exc, items[i]))
        if outcome is None:
            log.info("a tile worker cannot read this run's inputs; its images run here")
            blind.add(w)
            here.append(i)
            continue
        outcomes[i] = outcome
        if on_done is not None:
            on_done(outcome)
    done_here = segment_here([items[i] for i in here], model_path, config, out, pool, on_done=on_done)
    outcomes.update(zip(here, done_here, strict=True))
    return [outcomes[i] for i in range(len(items))]


def _send(worker: Any, item: BatchItem, model_path: str, config: RunConfig, out: str) -> Any:
    """One image to one worker (TileWorker.segment_image); its result's ObjectRef."""
    return worker.segment_image.remote(item, fingerprint(item.path), model_path, config, out)


def _private(exc: Exception, item: BatchItem) -> Exception:
    """`exc` as `keep_private` leaves it: no name of the item's input in its message."""
    try:
        with keep_private(item.names()):
            raise exc
    except Exception as private:
        return private
