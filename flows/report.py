"""What a run reports per image: one `ImageResult`, as a table row for the Prefect
artifact, the CLI's summary and the run record written beside the outputs.

Rows hold output names (non-identifying image ids), shapes, counts and timings: nothing
read from an input's metadata or its path (no patient identifier can reach a report). An
input's path is in the run record only when the run asked for it (--keep-paths), and
never in what goes to Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import fsspec

from pipeline.errors import SegpipeError
from pipeline.io.location import is_remote, local_path
from pipeline.store import StoreError, storage_refusal

log = logging.getLogger(__name__)

State = Literal["complete", "partial", "failed", "skipped"]
ERROR_MAX_CHARS = 300
RUN_RECORD = "segpipe-run.json"  # the last run's results, beside the outputs


@dataclass(frozen=True)
class ImageResult:
    """The outcome of one image in a run. `reused`: the output was already complete for
    this input, model and settings, so no tile ran (exports it lacked were written).
    `skipped`: the image was not selected (its `reason`: "not selected: Modality=CT"),
    and nothing of it was fetched, ingested or written.
    `input`: the input's path, only in the run record of a --keep-paths run (else None)."""

    input: str | None
    image_id: str
    state: State
    size: tuple[int, int] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    mask_fraction: dict[str, float] | None = None
    output: str | None = None
    exports: dict[str, str] = field(default_factory=dict)
    failed_tiles: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    reused: bool = False
    reason: str | None = None
    stored: str | None = None  # --store: "sent" (this run) or "stored before"
    qc: dict[str, Any] | None = None  # the QC verdict (pipeline.qc.QcVerdict.to_dict())
    instances: dict[str, int] | None = None  # instances found, by label name ({"nuclei": 812})

    @property
    def ok(self) -> bool:
        """Nothing left to do for this image: complete, or not one the run is for."""
        return self.state in ("complete", "skipped")

    @property
    def state_text(self) -> str:
        """The state as the table shows it: "complete (reused)", "skipped (not selected:
        BodyPartExamined=EXTREMITY)"."""
        if self.reused:
            return f"{self.state} (reused)"
        return f"{self.state} ({self.reason})" if self.reason else self.state

    @property
    def flagged(self) -> bool:
        return (self.qc or {}).get("verdict") == "flag"

    def row(self) -> dict[str, Any]:
        """A flat table row (strings and numbers)."""
        c = self.counts
        return {
            "image": self.image_id,
            "state": self.state_text,
            "size": f"{self.size[0]}x{self.size[1]}" if self.size else "",
            "tiles done": c.get("done", 0),
            "skipped": c.get("skipped", 0),
            "failed": c.get("failed", 0),
            "seconds": round(self.seconds, 1),
            "mask fraction": format_fractions(self.mask_fraction),
            "qc": format_qc(self.qc),
            "instances": format_instances(self.instances),
            "output": self.output or (self.error or ""),
        }


def from_summary(summary: Mapping[str, Any], seconds: float,
                 exports: Mapping[str, str] | None = None, reused: bool = False) -> ImageResult:
    """The result of an image whose output store exists (OutputStore.summary())."""
    state = summary["state"] if summary["state"] in ("complete", "partial") else "partial"
    return ImageResult(
        input=None, image_id=summary["image_id"], state=state,
        size=tuple(summary["full_hw"]),  # type: ignore[arg-type]
        counts=dict(summary["counts"]), seconds=seconds,
        mask_fraction=summary.get("mask_fraction"), output=summary["path"],
        exports=dict(exports or {}), failed_tiles=list(summary.get("failed", [])),
        reused=reused, qc=summary.get("qc"), instances=summary.get("instances"),
    )  # fmt: skip


def skipped(image_id: str, reason: str) -> ImageResult:
    """The result of an image the run's selection rules did not take."""
    return ImageResult(input=None, image_id=image_id, state="skipped", reason=reason)


def failed(image_id: str, exc: BaseException, seconds: float = 0.0) -> ImageResult:
    """The result of an image that raised: its error on one line, naming the image by its
    id (the flows' tasks already put the id in place of the input's path)."""
    return ImageResult(input=None, image_id=image_id, state="failed", seconds=seconds,
                       error=one_line_error(image_id, exc))


def one_line_error(uri: str, exc: BaseException) -> str:
    """'<file>: <message>' on one line. Project errors already start with the file (or
    the output store) they name; anything else gets its type and the file in front. Storage
    that refuses a write (full, read-only, forbidden) says so and names the path."""
    exc = storage_refusal(exc) or exc
    text = " ".join(str(exc).split())
    if not isinstance(exc, SegpipeError) or not text:
        text = f"{type(exc).__name__}: {text}".rstrip(": ")
    if uri not in text:
        text = f"{uri}: {text}"
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def format_fractions(fractions: Mapping[str, float] | None) -> str:
    if not fractions:
        return ""
    if len(fractions) == 1:
        return f"{next(iter(fractions.values())):.3f}"
    return ", ".join(f"{k} {v:.3f}" for k, v in fractions.items())


def format_instances(counts: Mapping[str, int] | None) -> str:
    """'812' (one instance image), '' when the model writes none or the image is not done."""
    if not counts:
        return ""
    if len(counts) == 1:
        return str(next(iter(counts.values())))
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def format_qc(verdict: Mapping[str, Any] | None) -> str:
    """'pass', 'flag: reason; reason', or '' (no verdict: not complete, or an older output)."""
    if not verdict:
        return ""
    reasons = verdict.get("reasons") or []
    return f"flag: {'; '.join(reasons)}" if verdict.get("verdict") == "flag" else str(verdict.get("verdict", ""))


def all_complete(results: Iterable[ImageResult]) -> bool:
    return all(r.ok for r in results)


def qc_flagged(results: Iterable[ImageResult]) -> list[str]:
    """One line per image whose QC verdict is flag, naming it by its id and the reasons."""
    return [f"{r.image_id}: QC {format_qc(r.qc)}" for r in results if r.flagged]


def totals(results: Sequence[ImageResult]) -> dict[str, int]:
    """Images per outcome: complete (of which reused), skipped, partial, failed; and DICOM
    SEGs sent to a PACS (--store)."""
    return {
        "images": len(results),
        "complete": sum(r.state == "complete" for r in results),
        "reused": sum(r.reused for r in results),
        "skipped": sum(r.state == "skipped" for r in results),
        "stored": sum(r.stored == "sent" for r in results),
        "partial": sum(r.state == "partial" for r in results),
        "failed": sum(r.state == "failed" for r in results),
        "qc flagged": sum(r.flagged for r in results),
    }


def problems(results: Iterable[ImageResult]) -> list[str]:
    """One line per image that is not complete: a failed image's error, or a partial
    image's failed tiles; naming the image by its id (and its input path when the result
    has one: a --keep-paths run, for the local console and record only)."""
    return [f"{line} (input {r.input})" if r.input else line for r, line in _problems(results)]


def _problems(results: Iterable[ImageResult]) -> list[tuple[ImageResult, str]]:
    lines = []
    for r in results:
        if r.state == "failed":
            lines.append((r, r.error or f"{r.image_id}: failed"))
        elif r.state == "partial":
            tiles = ", ".join(f"{tuple(t['tile'])}: {t['error']}" for t in r.failed_tiles[:3])
            more = len(r.failed_tiles) - 3
            lines.append((r, f"{r.image_id}: partial, {r.counts.get('failed', 0)} tiles failed"
                         + (f" ({tiles}{f', +{more} more' if more > 0 else ''})" if tiles else "")))
    return lines


def with_paths(results: Sequence[ImageResult], paths: Mapping[str, str]) -> list[ImageResult]:
    """The results with each one's input path (image id -> path: a --keep-paths run)."""
    return [replace(r, input=paths[r.image_id]) if r.image_id in paths else r for r in results]


def write_record(out_root: str, results: Sequence[ImageResult]) -> str:
    """Write the run's results to OUT/segpipe-run.json (a local folder or any fsspec URL),
    so `segpipe status` can list images that failed before their output existed. A result's
    `input` (its path) is there only from a --keep-paths run. The record
    is replaced whole or not at all: the last run's stays readable when this write fails
    (a full disk). Storage that refuses the write stops the run on one line naming it."""
    where = record_location(out_root)
    text = json.dumps({"totals": totals(results), "images": [asdict(r) for r in results]}, indent=1)
    try:
        if is_remote(where):
            with fsspec.open(where, "w") as f:  # an object store's put is atomic already
                f.write(text)
        else:
            _replace_atomically(local_path(where), text)
    except Exception as exc:  # botocore and other backends raise their own types
        mapped = storage_refusal(exc)
        reason = str(mapped) if mapped else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise StoreError(f"{where}: cannot write the run record ({reason})") from exc
    return where


def _replace_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside `path`, flush it to disk, then rename it over `path`
    (a rename within one folder is atomic): a reader sees the old record or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's is 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def read_record(out_root: str | Path, warn: Callable[[str], None] = log.warning) -> list[ImageResult]:
    """The last run's results written by `write_record` (empty when there is none). A
    record that cannot be read (empty, cut short, not ours) is one line to `warn`, and no
    record: what it would list is only the images that failed before any output existed."""
    where = record_location(out_root)
    try:
        with fsspec.open(where, "r") as f:
            raw = json.load(f)
        return [ImageResult(**{**r, "size": tuple(r["size"]) if r["size"] else None}) for r in raw["images"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError, OSError) as exc:  # JSONDecodeError is a ValueError
        mapped = storage_refusal(exc)
        reason = str(mapped) if mapped else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        warn(f"{where}: the last run's record is unreadable, ignored ({reason})")
        return []


def record_location(out_root: str | Path) -> str:
    """Where the run record lies: OUT/segpipe-run.json (a URL stays a URL)."""
    if is_remote(out_root):
        return f"{str(out_root).rstrip('/')}/{RUN_RECORD}"
    return str(local_path(out_root) / RUN_RECORD)
