"""Reading an output root back: its image stores, and each store as the ImageJob the
export stage takes (for `segpipe status` and `segpipe export`, which need no Prefect).

An output root is a local folder or any fsspec URL (s3://bucket/out): it is listed
through fsspec, and the stores open through zarr's fsspec store.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec

from pipeline.errors import InputError
from pipeline.io.location import is_remote, local_path
from pipeline.job import ImageJob
from pipeline.store import NotAStoreError, OutputStore, StoreError, storage_refusal

STORE_SUFFIX = ".zarr"


def stores(out_root: str | Path, unreadable: list[str] | None = None) -> list[OutputStore]:
    """Every segpipe output store directly under `out_root`, by image id. A segpipe store
    that does not open (damaged metadata, storage refusing) is one line in `unreadable`."""
    found = []
    for location in _store_locations(str(out_root)):
        try:
            found.append(OutputStore.open(location))
        except NotAStoreError:
            continue  # another tool's zarr in the same folder
        except (StoreError, OSError) as exc:
            if unreadable is not None:
                unreadable.append(" ".join(str(storage_refusal(exc) or exc).split()))
    return found


def check_writable(out_root: str) -> None:
    """Fail at once, on one line naming the path, when a local output root cannot take
    outputs: a file, a path under a file, a read-only, full or forbidden file system. Its
    nearest existing folder is probed with a nameless file; nothing is created (the run
    creates the root). A remote root: `check_reachable`."""
    if is_remote(out_root):
        return
    root = local_path(out_root).absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{out_root}: {'it' if existing == root else existing} is a file, not an output folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".segpipe-probe-") as probe:
            probe.write(b"segpipe")
            probe.flush()
    except OSError as exc:
        mapped = storage_refusal(exc)
        raise (mapped or InputError(f"{out_root}: cannot write ({type(exc).__name__}: {exc})")) from exc


def _store_locations(out_root: str) -> list[str]:
    """`<out_root>/*.zarr`, sorted; a URL stays a URL (the one rule: pipeline.io.location)."""
    if not is_remote(out_root):
        root = local_path(out_root)
        if not root.is_dir():
            raise InputError(f"{out_root}: no such output folder")
        return [str(p) for p in sorted(root.glob(f"*{STORE_SUFFIX}")) if p.is_dir()]
    base = out_root.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(base)
        fs.invalidate_cache(path)  # a long-running process must see stores written since
        entries = fs.ls(path, detail=True) if fs.isdir(path) else None
    except Exception as exc:  # botocore and other backends raise their own types
        raise storage_error(base, exc) from exc
    if entries is None:
        raise InputError(f"{base}: no such output folder")
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    return [f"{base}/{name}" for name in names if name.endswith(STORE_SUFFIX)]


def check_reachable(out_root: str) -> None:
    """Fail at once, on one line naming the URL, when a remote output root cannot be
    reached (no such endpoint, refused, forbidden, no such bucket), before any image runs.
    A local root is created by the run where it is missing."""
    if not is_remote(out_root):
        return
    try:
        fs, path = fsspec.core.url_to_fs(out_root)
        fs.invalidate_cache(path)
        # an object store (root_marker "") has the root only once something is written
        # under it, but its bucket, the path's first part, must exist already
        bucket = path.strip("/").split("/", 1)[0] if fs.root_marker == "" else ""
        present = fs.exists(path) or not bucket or fs.exists(bucket)
    except Exception as exc:
        raise storage_error(out_root, exc) from exc
    if not present:
        raise InputError(f"{out_root}: no such bucket or folder ({bucket})")


def storage_error(url: str, exc: BaseException) -> InputError:
    """One line naming the URL, for storage that cannot be reached or refuses access."""
    return InputError(f"{url}: cannot access ({type(exc).__name__}: {' '.join(str(exc).split())})")


def job_for(store: OutputStore, input_path: str | None = None) -> ImageJob:
    """The ImageJob of an existing store, from its layout and provenance (export reads only
    the store, the input path (DICOM SEG) and the image kind). The input path is
    `input_path`, else the one a --keep-paths run recorded, else empty."""
    lay, source = store.layout, store.provenance.get("input", {})
    return ImageJob(
        image_id=lay.image_id, input_path=input_path or source.get("path", ""), store_path=store.path,
        full_hw=lay.full_hw, work_hw=lay.work_hw, tile=lay.tile, halo=0,
        kind=(source.get("image") or {}).get("kind", "xray"),
    )  # fmt: skip
