"""Where an image's output lives: its non-identifying output name (``safe_image_id``), the
key that name is made with (``output_key``), the path of its group under the output root
(``store_path``) and the location the store opens.

Invariant 8: an input's path (hospital exports are named after the patient: folder and
file names) never becomes an output name. An image id is a keyed hash of the input's
resolved location, optionally behind a readable label the operator vouches for.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

import fsspec

from pipeline.io.location import is_remote, local_path
from pipeline.store.errors import StoreError

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LABEL_CHARS = 64
_ID_HASH_CHARS = 16  # 64 bits: a collision among a million inputs has odds ~3e-8
KEY_FILE = ".segpipe-key"  # per output root: ids are stable across runs into it
_KEY_BYTES = 32


def safe_image_id(input_path: str | Path, key: bytes, label: str | None = None) -> str:
    """The output name of an input: ``[<label>-]<HMAC-SHA256(key, location)>`` (16 hex).

    The location is the input's resolved absolute path (symlinks resolved, so a file named
    as part of a folder, by a relative or absolute path or through a link gets one id), or
    an fsspec URL as it is. The key is the output root's (``output_key``): ids are stable
    across runs into one output root, and cannot be recovered by hashing guessed names
    without the key. `label` (readable, vouched for by the operator as carrying no
    identifier) keeps only [A-Za-z0-9._-]. Deterministic.
    """
    text = str(input_path)
    where = text if is_remote(text) else local_path(text).resolve().as_posix()
    digest = hmac.new(key, where.encode(), hashlib.sha256).hexdigest()[:_ID_HASH_CHARS]
    tag = _readable_label(label) if label else ""
    return f"{tag}-{digest}" if tag else digest


def _readable_label(label: str) -> str:
    return _UNSAFE_CHARS.sub("_", label).strip("._-")[:_LABEL_CHARS].strip("._-")


def output_key(out_root: str | Path) -> bytes:
    """The output root's id key, read from ``<out_root>/.segpipe-key``; created on first use
    (32 random bytes, hex, mode 0600 on a local root; an object store's permissions are the
    bucket's). Two runs racing to create it agree: the file is created exclusively, and the
    loser reads the winner's."""
    if is_remote(out_root):
        where = f"{str(out_root).rstrip('/')}/{KEY_FILE}"
        fs, path = fsspec.core.url_to_fs(where)
        if not fs.exists(path):
            with fs.open(path, "w") as f:
                f.write(secrets.token_hex(_KEY_BYTES))
        with fs.open(path, "r") as f:
            return _parsed_key(where, f.read())
    path = local_path(out_root) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(_KEY_BYTES))
    return _parsed_key(str(path), path.read_text())


def _parsed_key(where: str, text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < 16:
        raise StoreError(f"{where}: not a segpipe id key (restore it from a backup, or use a new output root)")
    return key


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
