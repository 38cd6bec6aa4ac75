"""Watermarks: how far each DICOMweb source has been covered into one output root, so that
a nightly run asks the PACS only for what is new.

A source's watermark is the day of its last query after which every image it found ended
complete or skipped. The next query asks for studies dated from that day on (`study_window`:
the day itself again, and `lookback_days` before it, for studies that reach the PACS days
after they were made), within the source's own StudyDate range if it gives one. A night
that fails (the PACS down, an image failed, a SEG not stored) leaves the watermark where it
was: the next night asks for the same days again, and what that night had finished is
reused, never fetched again (the collection checks each instance's output by its id, a
keyed hash of its UIDs, before any WADO-RS retrieve).

Limit: DICOMweb has no "arrived since" query; a study dated before the window that reaches
the PACS late is found only by a run with --no-watermark (or a wider --lookback-days).

The watermarks lie in `<out>/.segpipe-watermarks.json`, keyed by a keyed hash of the
source's text (its query keys may carry anything the operator wrote), replaced whole.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from datetime import date, timedelta

import fsspec

from pipeline.errors import ConfigError
from pipeline.io.location import is_remote, local_path

WATERMARKS = ".segpipe-watermarks.json"
_FORMAT = "%Y%m%d"


def source_key(key: bytes, source: str) -> str:
    """A source's key in the watermarks file: HMAC(output root key, source text), 16 hex."""
    return hmac.new(key, source.encode(), hashlib.sha256).hexdigest()[:16]


def study_window(fixed: str | None, through: date | None, lookback_days: int) -> str | None:
    """The StudyDate range (DICOM range matching, "20240105-") a query asks for: from
    `through` minus `lookback_days` on, inside the source's own range `fixed` ("20240101-",
    "-20241231", "20240101-20240131" or one day "20240101"); None: any date."""
    low, high = _range(fixed)
    start = through - timedelta(days=lookback_days) if through is not None else None
    if low is not None and (start is None or low > start):
        start = low
    if start is None and high is None:
        return None
    if start is not None and high is not None and start > high:
        start = high  # the source's range is all covered: ask for its last day again
    return f"{_text(start)}-{_text(high)}"


def read(out_root: str) -> dict[str, date]:
    """source key -> watermark day, from the output root's file (empty when there is none)."""
    where = _location(out_root)
    try:
        with fsspec.open(where, "r") as f:
            raw = json.load(f)
        return {k: _day(v["through"], where) for k, v in raw.get("sources", {}).items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: unreadable watermarks ({type(exc).__name__}: {exc}); "
                          "remove the file to query every source whole again") from None  # fmt: skip


def advance(out_root: str, marks: dict[str, date]) -> None:
    """Set the watermarks `marks` (source key -> day), keeping the others; never moves one
    back (a slow run finishing after a later one)."""
    if not marks:
        return
    current = read(out_root)
    for key, day in marks.items():
        current[key] = max(day, current.get(key, day))
    text = json.dumps({"sources": {k: {"through": v.strftime(_FORMAT)} for k, v in sorted(current.items())}}, indent=1)
    where = _location(out_root)
    if is_remote(where):
        with fsspec.open(where, "w") as f:  # an object store's put is atomic already
            f.write(text)
        return
    path = local_path(where)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temp, path)  # a reader sees the old file or the new one


def _location(out_root: str) -> str:
    if is_remote(out_root):
        return f"{out_root.rstrip('/')}/{WATERMARKS}"
    return str(local_path(out_root) / WATERMARKS)


def _range(text: str | None) -> tuple[date | None, date | None]:
    if not text:
        return None, None
    low, dash, high = text.partition("-")
    if not dash:
        return _day(low, "StudyDate"), _day(low, "StudyDate")
    return (_day(low, "StudyDate") if low else None), (_day(high, "StudyDate") if high else None)


def _day(text: str, where: str) -> date:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) == 8 else _bad(text, where)
    except ValueError:
        return _bad(text, where)


def _bad(text: str, where: str) -> date:
    raise ConfigError(f"{where}: {text!r} is not a DICOM date (YYYYMMDD)")


def _text(day: date | None) -> str:
    return day.strftime(_FORMAT) if day is not None else ""
