"""One pool of tile workers per run, shared by the images in flight.

`pipeline.workers.infer_ray` starts actors for one image and stops them after it: right
for one image, wasteful for a collection (every image would start processes and load the
model again) and, with several images at once, each would wait for the others' actors to
free the cluster. A collection run therefore opens one `RunPool`; each image's infer stage
borrows a `SharedBackend` view of it. The pool starts on first use, so a run with nothing
new to compute starts no worker at all.

`SharedBackend` is the scheduler's Backend protocol over another Backend, for several
`run_tiles` callers (threads) at once: the underlying backend is driven under one lock,
finished tiles are handed to the view that submitted them, and the views together never
have more tiles in flight than the pool has slots.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.engine.scheduler import Backend
from pipeline.engine.tiling import Tile
from pipeline.job import ImageJob, TileReport

POLL_S = 0.02  # how long one view holds the pool's lock while waiting for results

Outcome = tuple[Hashable, TileReport | BaseException]


class SharedBackend:
    """A pool backend shared by several images; `view()` gives each image its Backend."""

    def __init__(self, backend: Backend):
        self._backend = backend
        self._lock = threading.Lock()
        self._owner: dict[Hashable, int] = {}  # submission -> view number
        self._mail: dict[int, list[Outcome]] = {}
        self._views = 0

    def view(self) -> _View:
        with self._lock:
            self._views += 1
            self._mail[self._views] = []
            return _View(self, self._views)

    def _slots(self, number: int) -> int:
        """The pool's slots less what the other views hold in flight."""
        with self._lock:
            others = sum(v != number for v in self._owner.values())
            return max(0, self._backend.slots - others)

    def _submit(self, number: int, job: ImageJob, tile: Tile, attempt: int) -> Hashable:
        with self._lock:
            key = self._backend.submit(job, tile, attempt)
            self._owner[key] = number
            return key

    def _wait(self, number: int, timeout: float) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for key, outcome in self._backend.wait(timeout=POLL_S):
                    # a released view's late tiles (its image raised) are dropped
                    box = self._mail.get(self._owner.pop(key, -1))
                    if box is not None:
                        box.append((key, outcome))
                mine, self._mail[number] = self._mail[number], []
            if mine or time.monotonic() >= deadline:
                return mine
            time.sleep(0)  # let a waiting view take the lock

    def _release(self, number: int) -> None:
        with self._lock:
            self._mail.pop(number, None)


class _View:
    """One image's Backend over a SharedBackend; its context ends only the view."""

    def __init__(self, shared: SharedBackend, number: int):
        self._shared = shared
        self._number = number

    @property
    def slots(self) -> int:
        return self._shared._slots(self._number)

    def submit(self, job: ImageJob, tile: Tile, attempt: int) -> Hashable:
        return self._shared._submit(self._number, job, tile, attempt)

    def wait(self, timeout: float) -> list[Outcome]:
        return self._shared._wait(self._number, timeout)

    def __enter__(self) -> _View:
        return self

    def __exit__(self, *exc: object) -> None:
        self._shared._release(self._number)


class RunPool:
    """A backend started on first use (`start()` -> a closable Backend) and shared by the
    images of one run; `close()` stops it if it ever started."""

    def __init__(self, start: Callable[[], Any]):
        self._start = start
        self._lock = threading.Lock()
        self._backend: Any = None
        self._shared: SharedBackend | None = None

    def view(self) -> _View:
        with self._lock:
            if self._shared is None:
                self._backend = self._start()
                self._shared = SharedBackend(self._backend)
            return self._shared.view()

    @property
    def started(self) -> bool:
        return self._shared is not None

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
            self._backend, self._shared = None, None


_pools: dict[str, RunPool] = {}
_pools_lock = threading.Lock()


@contextmanager
def run_pool(start: Callable[[], Any]) -> Iterator[str]:
    """Register a RunPool for the block; yields its key, which tasks pass to `lookup`."""
    key = uuid.uuid4().hex
    pool = RunPool(start)
    with _pools_lock:
        _pools[key] = pool
    try:
        yield key
    finally:
        with _pools_lock:
            _pools.pop(key, None)
        pool.close()


def lookup(key: str | None) -> RunPool | None:
    """The pool registered under `key` in this process, or None (no key, or the task runs
    in another process than the flow that opened it)."""
    if key is None:
        return None
    with _pools_lock:
        return _pools.get(key)
