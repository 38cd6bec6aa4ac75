"""Chunk checksums: what each stored chunk of an output array looked like when the driver
finalized the image, and what it looks like now.

One record per chunk of a checked array, in the array's chunk order (``np.ndindex`` of its
chunk grid), three int64 each:

    digest   blake2b-64 of the chunk's stored (encoded) bytes; 0 when the chunk is absent
    size     the stored bytes' length; ABSENT (-1) when no chunk is stored (zarr stores no
             chunk that holds only the fill value, so absence is a valid, recorded state)
    marker   a 64-bit hash of the storage's modification marker: mtime, ctime and inode
             locally, the ETag (else the modification time) on an object store; 0 unknown

The digest is over the encoded bytes read through the zarr store (so it works the same on
a local folder and on s3://): hashing costs a read of the compressed output, never a
decode, one batch of chunks at a time. Records live in the store's ``checksums`` group,
one int64 array per checked array, written by the driver alone (invariant 1).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from pipeline.store.errors import StoreError
from pipeline.store.layout import COMPRESSORS

GROUP = "checksums"
ABSENT = -1
DIGEST, SIZE, MARKER = 0, 1, 2
READ_BATCH = 16  # chunks read at once: memory stays at 16 encoded chunks, requests overlap


@dataclass(frozen=True)
class Seen:
    """A chunk as the storage lists it now (no bytes read)."""

    size: int  # ABSENT when no chunk is stored
    marker: int  # 0: the storage gives no modification marker


def chunk_keys(array: zarr.Array) -> list[str]:
    """Every chunk key of ``array`` relative to its store's root, in record order."""
    base = array.store_path.path
    return [_join(base, array.metadata.encode_chunk_key(c)) for c in np.ndindex(*array.cdata_shape)]


def measure(array: zarr.Array) -> np.ndarray:
    """Fresh records of every chunk of ``array``: reads each chunk's encoded bytes once."""
    keys = chunk_keys(array)
    records = np.zeros((len(keys), 3), np.int64)
    seen = listing(array, keys)
    for i, data in read_many(array, keys, range(len(keys))):
        records[i] = (digest(data), ABSENT if data is None else len(data), seen[i].marker)
    return records


def listing(array: zarr.Array, keys: Sequence[str]) -> list[Seen]:
    """Size and modification marker of each key, without reading chunk bytes: a stat per
    chunk locally, one recursive listing of the array on an fsspec store."""
    store = array.store_path.store
    if isinstance(store, LocalStore):
        return [_stat(os.path.join(store.root, k)) for k in keys]
    if isinstance(store, FsspecStore):
        return _listed(store, array.store_path.path, keys)
    sizes = sync(_sizes(store, keys))  # any other store: sizes only, content is checked
    return [Seen(s, 0) for s in sizes]


def read_many(array: zarr.Array, keys: Sequence[str], rows: Sequence[int] | range
              ) -> Iterator[tuple[int, bytes | None]]:  # fmt: skip
    """(row, encoded bytes or None when absent) for the chunks at ``rows``, READ_BATCH at a
    time. A storage error becomes a StoreError naming the chunk's key."""
    store = array.store_path.store
    rows = list(rows)
    for start in range(0, len(rows), READ_BATCH):
        batch = rows[start : start + READ_BATCH]
        try:
            found = sync(_get_many(store, [keys[i] for i in batch]))
        except (OSError, RuntimeError, ValueError) as exc:  # botocore's are OSErrors or wrapped
            where = f"{array.store_path}: chunks {keys[batch[0]].rsplit('/c/', 1)[-1]} on"
            raise StoreError(f"{where}: cannot read ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
        yield from zip(batch, found, strict=True)


def delete(array: zarr.Array, keys: Sequence[str]) -> None:
    """Remove chunks (driver only, for a repair: an absent chunk reads as the fill value)."""
    store = array.store_path.store
    for key in keys:
        sync(store.delete(key))


def digest(data: bytes | None) -> int:
    """blake2b-64 of a chunk's encoded bytes as a signed int64 (0 for an absent chunk)."""
    if data is None:
        return 0
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def records_group(group: zarr.Group) -> zarr.Group:
    """The store's group of checksum records (created when missing), for write_records."""
    return group.require_group(GROUP)


def write_records(checks: zarr.Group, name: str, records: np.ndarray) -> None:
    """Store the records of array ``name`` (driver only) in ``checks`` (records_group),
    replacing older ones."""
    arr = checks.create_array(
        record_name(name), shape=records.shape, dtype="int64", chunks=records.shape,
        compressors=COMPRESSORS, overwrite=True,
    )  # fmt: skip
    arr[...] = records


def read_records(group: zarr.Group, name: str) -> np.ndarray | None:
    """The recorded checksums of array ``name``, or None when none were recorded."""
    try:
        return np.asarray(group[f"{GROUP}/{record_name(name)}"][...])
    except KeyError:
        return None


def record_name(name: str) -> str:
    """'labels/mask/0' -> 'labels.mask.0': one flat array per checked array."""
    return name.replace("/", ".")


def decode_error(path: str, name: str, array: zarr.Array, exc: Exception, selection: Any = ...) -> StoreError:
    """One line for a read of ``array[selection]`` that failed to decode, naming the first
    chunk there that does not decode (found by reading them one by one: this runs only once
    a read has failed)."""
    bad = "?"
    for coords in _chunks_in(array, selection):
        region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, array.chunks, strict=True))
        try:
            array[region]
        except (RuntimeError, ValueError):
            bad = array.metadata.encode_chunk_key(coords)
            break
    text = " ".join(str(exc).split())
    return StoreError(f"{path}: {name} chunk {bad} cannot be decoded ({type(exc).__name__}: {text}); "
                      "the output is damaged: `segpipe status --verify` sets it to be repaired")


def _chunks_in(array: zarr.Array, selection: Any) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of the chunks a basic selection (slices or ``...``) touches."""
    if selection is Ellipsis:
        selection = ()
    parts = tuple(selection) + (slice(None),) * (array.ndim - len(tuple(selection)))
    ranges = []
    for part, size, chunk in zip(parts, array.shape, array.chunks, strict=True):
        start, stop, _ = part.indices(size)
        ranges.append(range(start // chunk, max(start // chunk, -(-stop // chunk))))
    return itertools.product(*ranges)


# -- storage ------------------------------------------------------------------------------


def _join(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key}" if base else key


def _stat(path: str) -> Seen:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Seen(ABSENT, 0)
    # mtime alone can be set back (touch -d, cp -p); ctime and inode cannot: any of the
    # three changing costs only a content check, never a false "damaged"
    return Seen(st.st_size, _marker(f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"))


def _listed(store: FsspecStore, prefix: str, keys: Sequence[str]) -> list[Seen]:
    root = _join(store.path.rstrip("/"), prefix)
    # a listing cached by this process would miss chunks the workers wrote since
    store.fs.invalidate_cache(root)
    try:
        found = sync(store.fs._find(root, detail=True))
    except FileNotFoundError:
        found = {}
    except Exception as exc:  # botocore and other backends raise their own types
        raise StoreError(f"{store}: cannot list {prefix} ({type(exc).__name__}: {exc})") from exc
    head = store.path.strip("/")
    by_key = {name.strip("/").removeprefix(head).lstrip("/"): info for name, info in found.items()}
    seen = []
    for key in keys:
        info = by_key.get(key)
        if info is None:
            seen.append(Seen(ABSENT, 0))
            continue
        marker = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "created") if k in info), "")
        seen.append(Seen(int(info.get("size") or 0), _marker(marker)))
    return seen


def _marker(text: str) -> int:
    if not text:
        return 0
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


async def _get_many(store: zarr.abc.store.Store, keys: Sequence[str]) -> list[bytes | None]:
    prototype = default_buffer_prototype()
    found = await asyncio.gather(*(store.get(k, prototype=prototype) for k in keys))
    return [None if buf is None else buf.to_bytes() for buf in found]


async def _sizes(store: zarr.abc.store.Store, keys: Sequence[str]) -> list[int]:
    async def size(key: str) -> int:
        try:
            return await store.getsize(key)
        except FileNotFoundError:
            return ABSENT

    return list(await asyncio.gather(*(size(k) for k in keys)))
