"""The run's pool of tile workers: one per run, shared by the images in flight.

Starting workers per image would be right for one image and wasteful for a collection
(every image would start processes and load the model again) and, with several images at
once, each would wait for the others' workers to free the cluster. A run therefore opens
one `RunPool` and passes it, as an object, to each image's infer stage, which leases a
`SharedBackend` view of it. The pool starts on first lease, so a run with nothing new to
compute starts no worker at all. Which backend it starts (threads in this process, or Ray
actors) is chosen once, by whoever opens the pool: `local_pool` here, `workers.ray_pool`.

`SharedBackend` is the scheduler's Backend protocol over another Backend, for several
`run_tiles` callers (threads) at once: the underlying backend is driven under one lock,
finished tiles are handed to the view that submitted them, and the views together never
have more tiles in flight than the pool has slots.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from pipeline.config import RunConfig
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

    def image_workers(self) -> list[Any] | None:
        offer = getattr(self._backend, "image_workers", None)
        if offer is None:
            return None
        with self._lock:
            return offer()

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
    """A backend started on first lease (`start()` -> a closable Backend) and shared by
    the images of one run; closing the pool stops the backend if it ever started."""

    def __init__(self, start: Callable[[], Any]):
        self._start = start
        self._lock = threading.Lock()
        self._backend: Any = None
        self._shared: SharedBackend | None = None

    def lease(self) -> _View:
        """One image's Backend over the pool (a context manager that ends only the view)."""
        with self._lock:
            if self._shared is None:
                self._backend = self._start()
                self._shared = SharedBackend(self._backend)
            return self._shared.view()

    def image_workers(self, wait: bool = True) -> list[Any] | None:
        """The workers up now that take whole images (`pipeline.whole_images`); with `wait`,
        once one is. None when the backend runs tiles only (tiles in this process: its images
        run here too). Starts the backend."""
        with self.lease() as view:
            assert self._shared is not None
            while True:
                workers = self._shared.image_workers()
                if workers is None or workers or not wait:
                    return workers
                view.wait(POLL_S)  # what starts and probes the workers (placement is watched there)

    @property
    def started(self) -> bool:
        return self._shared is not None

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
            self._backend, self._shared = None, None

    def __enter__(self) -> RunPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_pool(model_path: str, config: RunConfig) -> RunPool:
    """Tiles in this process: two threads over one TileRunner (the model loaded on the
    first lease, and kept for every image of the run and for later runs of this process
    with the same checkpoint and settings: `runner.shared_runner`)."""

    def start() -> Backend:
        from pipeline.engine.runner import (
            shared_runner,  # torch: only once there is work
        )
        from pipeline.engine.scheduler import ThreadBackend

        return ThreadBackend(shared_runner(model_path, config))

    return RunPool(start)
