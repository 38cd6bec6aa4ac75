"""Patient identifiers stay with the input (invariant 8): inside `keep_private(names)`, an
input's path, URL or file name becomes its image id in every log record made and in the
message of any error raised. Prefect-free, so that a driver's tasks and a worker running
whole images apply the same rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pipeline.errors import InputError, SegpipeError

_PRIVATE: ContextVar[Mapping[str, str]] = ContextVar("segpipe_private_names", default={})


@contextmanager
def keep_private(names: Mapping[str, str]) -> Iterator[None]:
    """Nothing raised or logged inside names an input: each key of `names` (a path, a URL,
    a file name) becomes its value (the image id) in log records made in this context
    (the readers' warnings start with the file) and in an error's message; the error's
    cause and context are dropped (Prefect stores and logs the whole chain). The error
    keeps its kind: a segpipe error stays one (no retry), anything else becomes an OSError
    (retried, as a storage hiccup would be) or a RuntimeError."""
    token = _PRIVATE.set({**_PRIVATE.get(), **{k: v for k, v in names.items() if k}})
    try:
        yield
    except Exception as exc:
        text = _replaced(str(exc), names)
        if text == str(exc):
            raise
        raise _same_kind(exc, text) from None
    finally:
        _PRIVATE.reset(token)


def _replaced(text: str, names: Mapping[str, str]) -> str:
    for name in sorted((k for k in names if k and k in text), key=len, reverse=True):
        text = text.replace(name, names[name])
    return text


def _redacting(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """A log record factory that applies the context's `keep_private` names to the message
    (context-local: a task's thread sees only its own image's names)."""

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        names = _PRIVATE.get()
        if names:
            text = record.getMessage()
            private = _replaced(text, names)
            if private != text:
                record.msg, record.args = private, ()
        return record

    make.segpipe_redacting = True  # type: ignore[attr-defined]
    return make


if not getattr(logging.getLogRecordFactory(), "segpipe_redacting", False):
    logging.setLogRecordFactory(_redacting(logging.getLogRecordFactory()))


def _same_kind(exc: Exception, text: str) -> Exception:
    if isinstance(exc, SegpipeError):
        try:
            return type(exc)(text)
        except Exception:
            return InputError(text)
    if isinstance(exc, OSError):
        return OSError(f"{type(exc).__name__}: {text}")
    return RuntimeError(f"{type(exc).__name__}: {text}")
