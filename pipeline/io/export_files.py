"""Where an export lies and what every export writer shares: reading a mask level tile
by tile, and putting the finished file in place.

Every writer takes a local path or any fsspec URL (s3://..., memory://...): the file is
written to a local temporary file and then renamed into place, or uploaded, so a
half-written export never lies under its name (a re-run decides what is missing by what
exists, ``export_exists``). Limit: a remote export needs local temporary space of its
size (``TMPDIR``). Writers in their own modules (dicom_seg.py, slide_tiff.py, geojson.py,
exports.py) import these; the registry in exports.py imports the writers, so this module
imports none of them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np

from pipeline.io.location import is_remote, local_path

EXPORT_TILE = 512  # the side of a TIFF export's tiles


def tiles(level: Any, side: int = EXPORT_TILE) -> Iterator[np.ndarray]:
    """side^2 tiles of ``level`` in TIFF order (rows of tiles), edge tiles padded with
    background, each read on its own so memory holds one tile."""
    height, width = level.shape
    for y in range(0, height, side):
        for x in range(0, width, side):
            tile = np.zeros((side, side), np.uint8)
            block = np.asarray(level[y : y + side, x : x + side])
            tile[: block.shape[0], : block.shape[1]] = block
            yield tile


def export_location(store_path: str | Path, suffix: str) -> str:
    """The file an export of the store at ``store_path`` is written to: beside the store,
    ``<out>/<image_id><suffix>`` (a URL stays a URL: no local path join on it)."""
    text = str(store_path).rstrip("/")
    if is_remote(text):
        return f"{text.removesuffix('.zarr')}{suffix}"
    return f"{local_path(text).with_suffix('')}{suffix}"


def export_exists(location: str | Path) -> bool:
    """True when the export file is there (a local path or any fsspec URL). Listings are
    read afresh: a long-running process (``segpipe serve``) must see files deleted or
    written by others since it last looked."""
    if not is_remote(location):
        return local_path(location).is_file()
    fs, path = fsspec.core.url_to_fs(str(location))
    fs.invalidate_cache(path)
    return bool(fs.isfile(path))


@contextmanager
def writing(location: str | Path) -> Iterator[Path]:
    """A local file for a writer to fill; when the writer is done it becomes ``location``:
    renamed into place (local) or uploaded (a URL). On an error nothing is left under the
    export's name, so an existing export is always a whole one."""
    if not is_remote(location):
        final = local_path(location)
        partial = final.with_name(f".{final.name}.part")  # hidden: discovery skips it
        try:
            yield partial
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        return
    url = str(location)
    with tempfile.TemporaryDirectory(prefix="segpipe-export-") as folder:
        local = Path(folder) / PurePosixPath(url).name
        yield local
        _upload(local, url)


def _upload(local: Path, url: str) -> None:
    """Put a finished local file at ``url``; a failure names the URL (an OSError, so the
    export task retries it: storage hiccups pass)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.put_file(str(local), path)
    except Exception as exc:  # botocore, gcsfs, ... raise their own types, not OSError
        raise OSError(f"{url}: cannot write the export ({type(exc).__name__}: {exc})") from exc
