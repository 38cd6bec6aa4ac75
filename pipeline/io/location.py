"""Where things are: the one rule for telling a remote (fsspec) URL from a local path,
and the one way a file's content is hashed (streamed, local or remote)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.io.dicom_series import members

HASH_BLOCK = 1 << 20  # bytes read at a time: hashing holds one block, whatever the file


def is_remote(location: str | Path) -> bool:
    """True for an fsspec URL other than file:// (s3://, gs://, https://, memory://, ...):
    it is read through fsspec, and has no local path."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local path or file:// URL as a Path (user's ~ expanded)."""
    return Path(str(location).removeprefix("file://")).expanduser()


def sha256(location: str | Path) -> str:
    """sha256 of a file's bytes, streamed; a remote URL is read through fsspec."""
    digest = hashlib.sha256()
    if is_remote(location):
        import fsspec

        opened = fsspec.open(str(location), "rb")
    else:
        opened = open(local_path(location), "rb")
    with opened as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_cached(location: str | Path) -> str:
    """`sha256`, hashed once per process for a local file (keyed by its real path, size
    and modification time, so a rewritten file is hashed again): a checkpoint's, which an
    archive run records in every image's provenance (hashed per image, it cost more than
    a small image's mask)."""
    if is_remote(location):
        return sha256(location)
    path = local_path(location)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256(location)
    return _HASHES[key]


def content_hash(location: str | Path) -> str:
    """What provenance records as an input's content: sha256 of a file; for a DICOM WSI
    (any instance file of the series, or its folder) the sha256 of its instance files'
    bytes in name order; for a directory (a zarr store) the hash of its files' names and
    sizes and of its JSON metadata."""
    if is_remote(location):
        return sha256(location)
    files = members(local_path(location))
    if files is not None:
        digest = hashlib.sha256()
        for file in files:
            digest.update(sha256(file).encode())
        return digest.hexdigest()
    if local_path(location).is_file():
        return sha256(location)
    root = local_path(location)
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest.update(f"{p.relative_to(root)}|{p.stat().st_size}".encode())
            if p.suffix == ".json":
                digest.update(p.read_bytes())
    return digest.hexdigest()
