"""Driver side of a run over one image's tiles: bounded submission, retries with backoff,
status records. Independent of where tiles run: a `Backend` runs them (threads in this
process, or Ray actors in workers.py) and hands back reports or exceptions.

The driver is the only writer of the status grid; workers write only their tiles' pixels.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Protocol

from pipeline.engine.tiling import Tile
from pipeline.job import ImageJob, TileReport, TileStatus
from pipeline.store import OutputStore

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.05  # first retry waits this long, doubling per attempt
FLUSH_EVERY_S = 1.0  # status grid writes are batched: one write per second at most
# A tile lost with its worker this many times is recorded FAILED: a tile that kills the
# process running it (a decoder crash, the OOM killer) must not be resubmitted forever.
MAX_LOSSES = 3


class WorkerLost(Exception):
    """The process running a tile died; the tile is resubmitted without counting an
    attempt, up to MAX_LOSSES times."""


class Runner(Protocol):
    """Computes and writes one tile (engine.runner.TileRunner; benchmarks pass a no-op)."""

    def run(self, job: ImageJob, tile: Tile, attempt: int) -> TileReport: ...


class Backend(Protocol):
    """Runs tiles somewhere. `slots` bounds how many are in flight (backpressure)."""

    slots: int

    def submit(self, job: ImageJob, tile: Tile, attempt: int) -> Hashable: ...

    def wait(self, timeout: float) -> list[tuple[Hashable, TileReport | BaseException]]:
        """Finished submissions, at least one unless `timeout` passes first."""
        ...


@dataclass
class _Pending:
    tile: Tile
    attempt: int = 1
    not_before: float = 0.0
    losses: int = 0  # times its worker died under it


Progress = Callable[[TileReport], None]


def run_tiles(
    job: ImageJob,
    tiles: Iterable[Tile],
    backend: Backend,
    store: OutputStore,
    retries: int,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Run `tiles` to DONE or FAILED, recording each in the store; returns the counts."""
    private = _privacy(job)
    queue = deque(_Pending(t) for t in tiles)
    in_flight: dict[Hashable, _Pending] = {}
    unsaved: list[TileReport] = []
    last_flush = time.monotonic()
    while queue or in_flight:
        now = time.monotonic()
        while queue and len(in_flight) < backend.slots and queue[0].not_before <= now:
            item = queue.popleft()
            in_flight[backend.submit(job, item.tile, item.attempt)] = item
        delay = max(0.0, queue[0].not_before - now) if queue else None
        finished = backend.wait(timeout=0.1 if delay is None else min(delay, 0.1) or 0.01)
        for key, outcome in finished:
            item = in_flight.pop(key)
            report = _settle(item, outcome, retries, queue, private)
            if report is not None:
                unsaved.append(report)
                if progress is not None:
                    progress(report)
        if unsaved and (time.monotonic() - last_flush > FLUSH_EVERY_S or not (queue or in_flight)):
            store.set_many(unsaved)
            unsaved, last_flush = [], time.monotonic()
    if unsaved:
        store.set_many(unsaved)
    return store.counts()


def _privacy(job: ImageJob) -> Callable[[str], str]:
    """What a tile's error becomes before it is logged or stored: a worker's message may
    name the input (a reader's errors start with its file), and names stay with the input
    (invariant 8): the image id stands in for its path and for its file name."""
    names = sorted({job.input_path, PurePath(job.input_path).name} - {""}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for name in names:
            text = text.replace(name, job.image_id)
        return text

    return scrub


def _settle(item: _Pending, outcome: TileReport | BaseException, retries: int,
            queue: deque[_Pending], private: Callable[[str], str] = str) -> TileReport | None:  # fmt: skip
    """A final report for the tile, or None when it was queued again."""
    if isinstance(outcome, TileReport):
        if outcome.error:
            return replace(outcome, error=private(outcome.error))
        return outcome
    if isinstance(outcome, WorkerLost):
        if item.losses + 1 < MAX_LOSSES:
            log.warning("tile %s: worker lost, resubmitting", item.tile.index)
            queue.appendleft(_Pending(item.tile, item.attempt, losses=item.losses + 1))
            return None
        error = private(f"worker lost {MAX_LOSSES} times running this tile; last: {outcome}")
        log.error("tile %s failed: %s", item.tile.index, error)
        return TileReport(item.tile.index, TileStatus.FAILED, error=error, attempts=item.attempt)
    error = private(f"{type(outcome).__name__}: {outcome}".splitlines()[0])
    if item.attempt <= retries:
        log.info("tile %s attempt %d failed (%s); retrying", item.tile.index, item.attempt, error)
        wait_s = BACKOFF_BASE_S * 2 ** (item.attempt - 1)
        queue.append(_Pending(item.tile, item.attempt + 1, time.monotonic() + wait_s))
        return None
    log.error("tile %s failed after %d attempts: %s", item.tile.index, item.attempt, error)
    return TileReport(item.tile.index, TileStatus.FAILED, error=error, attempts=item.attempt)


class ThreadBackend:
    """Tiles in this process: two threads share one TileRunner, so one reads and writes
    while the other computes (the runner's lock keeps one model call at a time)."""

    def __init__(self, runner: Runner, threads: int = 2):
        self.runner = runner
        self.slots = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="segpipe-tile")
        self._futures: set[Future] = set()

    def submit(self, job: ImageJob, tile: Tile, attempt: int) -> Hashable:
        future = self._pool.submit(self.runner.run, job, tile, attempt)
        self._futures.add(future)
        return future

    def wait(self, timeout: float) -> list[tuple[Hashable, TileReport | BaseException]]:
        if not self._futures:  # only retries waiting out their backoff: don't spin
            time.sleep(timeout)
            return []
        done, _ = wait(self._futures, timeout=timeout, return_when=FIRST_COMPLETED)
        self._futures -= done
        return [(f, f.exception() or f.result()) for f in done]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
