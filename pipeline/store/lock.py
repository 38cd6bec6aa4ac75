"""One run at a time on each image's output: an advisory lock per output store.

Two runs pointed at the same output root (a served schedule that overlaps a manual run,
two operators) would otherwise both compute every tile of every image. The run that
holds an image's lock works on it; another run moves on to the images nobody holds and
comes back to the held ones when it has nothing else to do, by which time they are
usually complete (and reused, no tile run twice).

The lock is `flock` on ``<out_root>/.locks/<image_id>.lock`` (a hidden folder: discovery
skips it). The kernel drops it when its holder dies, however it dies, so a killed run
never leaves an image locked; it works on local disks and on NFSv4 (Linux maps flock to
byte-range locks there). An object store offers nothing of the kind without a lease
service: on an fsspec URL the lock is always granted and concurrent runs may repeat
each other's tiles (they never corrupt them: a tile's chunks have one writer per run,
and every run writes the same bytes).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from pipeline.io.location import is_remote, local_path
from pipeline.store.errors import StoreError, storage_refusal

LOCK_DIR = ".locks"
POLL_S = 1.0  # how often a waiting run tries again (flock has no timed wait)


class StoreLock:
    """The lock on one image's output store: `try_acquire` now or `acquire` by waiting."""

    def __init__(self, out_root: str | Path, image_id: str) -> None:
        self.path: Path | None = None if is_remote(out_root) else local_path(out_root) / LOCK_DIR / f"{image_id}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None or self.path is None

    def try_acquire(self) -> bool:
        """Take the lock if no other holder has it; True when this object holds it."""
        if self.held:
            return True
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise storage_refusal(exc) or StoreError(f"{self.path}: cannot create the lock ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise StoreError(f"{self.path}: cannot lock ({exc})") from exc
        self._fd = fd
        return True

    def acquire(self, timeout: float | None = None) -> bool:
        """Wait for the lock (polling: a blocking flock could not be given up); False when
        `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race with a waiter that
        opened it already and would then hold a lock on a file nobody else sees)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # a dropped lock object must not keep its file descriptor
        self.release()

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
