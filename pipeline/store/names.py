"""Where an image's output lives: its safe output name (``safe_image_id``), the path of
its group under the output root (``store_path``) and the location the store opens."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from pipeline.io.location import is_remote, local_path
from pipeline.store.errors import StoreError

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ID_STEM_CHARS = 64
_ID_HASH_CHARS = 12  # 48 bits: a collision among a million inputs has odds ~1e-3


def safe_image_id(input_path: str | Path, root: str | Path | None = None) -> str:
    """The output name of an input: ``<readable stem>-<hash of its full path>``.

    The stem keeps only [A-Za-z0-9._-] and never starts with a dot, so ``<id>.zarr`` stays
    inside the output root. The hash is of the resolved path (relative to ``root`` when
    the input lies under it, so moving a collection keeps its ids): two ``scan.dcm`` in
    different folders get different ids. Deterministic.
    """
    text = str(input_path)
    if is_remote(text):  # an fsspec URL names its object already; nothing to resolve
        key, name = text, PurePosixPath(text.split("://", 1)[1]).name
    else:
        path = local_path(text).resolve()
        key, name = path.as_posix(), path.name
        if root is not None:
            base = local_path(root).resolve()
            if path.is_relative_to(base):
                key = path.relative_to(base).as_posix()
    digest = hashlib.sha256(key.encode()).hexdigest()[:_ID_HASH_CHARS]
    return f"{_readable_stem(name)}-{digest}"


def _readable_stem(name: str) -> str:
    stem = PurePosixPath(name).stem
    if stem.lower().endswith(".ome"):  # slide.ome.tiff
        stem = stem[: -len(".ome")]
    stem = _UNSAFE_CHARS.sub("_", stem).strip("._-")[:_ID_STEM_CHARS].strip("._-")
    return stem or "image"


def store_path(out_root: str | Path, image_id: str) -> str:
    """Where an image's output group lives: ``<out_root>/<image_id>.zarr`` (path or URL)."""
    if not _SAFE_ID.match(image_id) or ".." in image_id:
        raise StoreError(f"{out_root}: unsafe image id {image_id!r}; use safe_image_id")
    if is_remote(out_root):
        return f"{str(out_root).rstrip('/')}/{image_id}.zarr"
    return str(local_path(out_root) / f"{image_id}.zarr")


def store_location(path: str | Path) -> str:
    """What zarr opens for a store path: a remote URL as it is, else the local path."""
    return str(path) if is_remote(path) else str(local_path(path))
