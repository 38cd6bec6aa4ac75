"""Progress of a run as events, for whoever watches in this process (the CLI's bars).

Tasks run in threads of the process that runs the flow; they `emit` events and every
listener registered with `listen` gets them. A flow served by a Prefect worker has no
listener: its progress goes to Prefect artifacts only. Events carry output names and tile
counts, never input metadata.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["discovered", "started", "tiles", "finished"]


@dataclass(frozen=True)
class Event:
    """`discovered`: `total` images in the run. `started`: an image's inference begins with
    `done` of `total` tiles already settled. `tiles`: `done` more tiles settled.
    `finished`: the image reached `state`."""

    kind: Kind
    image_id: str = ""
    done: int = 0
    total: int = 0
    state: str = ""


Listener = Callable[[Event], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Send every event emitted in this process to `listener` while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)


def emit(event: Event) -> None:
    """Deliver `event` to the listeners; a failing listener is logged, never raised into
    the run."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # a display problem must not fail an image
            log.exception("progress listener failed on %s", event.kind)
