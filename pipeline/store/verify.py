"""Verifying a finished store against the chunk checksums its finalize recorded, and
scheduling the repair of what does not verify (invariant 5: outputs are verified, not
trusted).

What is checked (``verify_store``):
- every chunk of ``prob/0`` and ``labels/mask/0`` (and ``instances/<name>``, the tiles'
  instance keys) owned by a DONE or SKIPPED tile (a FAILED or PENDING tile is recomputed
  anyway; a tile may own several mask chunks, a chunk has one owner), and every chunk of
  the pyramid levels 1.. of both and of every level of ``labels/<name>`` (finalize makes
  those from the keys, so finalize alone repairs them);
- the status grid's consistency: a store marked complete whose grid holds a FAILED or
  PENDING tile is damaged.

Two depths, chosen by the caller, not by a setting:
- ``full=True`` reads every checked chunk's encoded bytes and compares its digest: the one
  check that finds bytes altered in place behind the storage's back (media errors).
  `segpipe status --verify` and `segpipe export` use it.
- ``full=False`` (a run deciding whether to reuse an output) lists the chunks: each must be
  present or absent as recorded, with its recorded size; a chunk whose modification marker
  changed since finalize (rewritten, copied, restored) has its bytes read and compared.
  So a nightly run over an unchanged archive reads no pixel, and any write since finalize
  is still caught; only a flip that leaves size, mtime, ctime and inode (or ETag) alone
  needs the full check.

Repair (``schedule_repair``, driver side): damaged tiles go back to PENDING and the state
to partial, so the normal infer stage recomputes exactly them and finalize rebuilds the
pyramid (pyramid-only damage needs no tile: finalize alone repairs it). A SKIPPED tile
owns no stored chunk: a chunk found there is deleted, which restores its fill value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zarr

from pipeline.engine.tiling import Box, Tile, plan_tiles
from pipeline.job import TileReport, TileStatus
from pipeline.store.checksums import (
    ABSENT,
    DIGEST,
    MARKER,
    SIZE,
    chunk_keys,
    delete,
    digest,
    listing,
    read_many,
)
from pipeline.store.errors import StoreError
from pipeline.store.layout import StoreLayout

DAMAGE_LINES_KEPT = 20  # damage lines kept in the store's metadata for `segpipe status`
_CHECKED_TILES = (TileStatus.DONE, TileStatus.SKIPPED)


class CheckedStore(Protocol):
    """What verifying needs of an OutputStore (store.py imports this module, so it is
    named by what it offers)."""

    path: str
    layout: StoreLayout
    prob: zarr.Array
    prob_name: str

    @property
    def state(self) -> str: ...
    @property
    def mask(self) -> zarr.Array: ...
    def status_grid(self) -> np.ndarray: ...
    def owned_boxes(self, tile: Tile) -> tuple[Box, Box]: ...
    def checked_arrays(self) -> dict[str, zarr.Array]: ...
    def checksum_records(self, name: str) -> np.ndarray | None: ...
    def set_many(self, reports: Iterable[TileReport]) -> None: ...
    def record_damage(self, lines: list[str]) -> None: ...


@dataclass(frozen=True)
class Damage:
    """One chunk that does not match its record."""

    array: str  # "prob/0", "labels/mask/0", ...
    key: str  # the chunk's key in the store
    reason: str
    tile: tuple[int, int] | None  # its owner tile; None for a pyramid level

    def line(self) -> str:
        owner = f"tile {self.tile}: " if self.tile is not None else ""
        return f"{owner}{self.array} chunk {self.key.rsplit('/c/', 1)[-1]}: {self.reason}"


@dataclass(frozen=True)
class Verdict:
    """What ``verify_store`` found in one store."""

    path: str
    full: bool
    damage: tuple[Damage, ...] = ()
    status_tiles: tuple[tuple[tuple[int, int], str], ...] = ()  # (tile, status) FAILED or
    # PENDING in a store marked complete
    unrecorded: tuple[str, ...] = ()  # checked arrays without (matching) checksums
    not_checked: str | None = None  # why nothing was checked (a store being written)
    moved: int = 0  # chunks with a new modification marker and their recorded bytes

    @property
    def ok(self) -> bool:
        return not (self.damage or self.status_tiles or self.unrecorded)

    @property
    def damaged_tiles(self) -> list[tuple[int, int]]:
        owned = {d.tile for d in self.damage if d.tile is not None}
        return sorted(owned | {t for t, _ in self.status_tiles})

    def lines(self) -> list[str]:
        """One line per finding (callers cap how many they show)."""
        found = [f"tile {t}: {s} in an output marked complete" for t, s in self.status_tiles]
        found += [f"{name}: no checksums recorded (finalized before they existed, or "
                  "interrupted)" for name in self.unrecorded]  # fmt: skip
        return found + [d.line() for d in self.damage]

    def summary(self) -> str:
        """One line for the whole store."""
        if self.ok:
            return f"{self.path}: verified" if self.not_checked is None else f"{self.path}: {self.not_checked}"
        lines = self.lines()
        more = f" (+{len(lines) - 3} more)" if len(lines) > 3 else ""
        return f"{self.path}: damaged, {'; '.join(lines[:3])}{more}"


def verify_store(store: CheckedStore, *, full: bool = True) -> Verdict:
    """Check a finalized store's chunks against their checksums and its status grid
    (module docstring). A store being written ("pending", "running") is not checked."""
    state = store.state
    if state not in ("complete", "partial"):
        return Verdict(store.path, full, not_checked=f"not checked: {state}")
    grid = store.status_grid()
    status_tiles: tuple[tuple[tuple[int, int], str], ...] = ()
    if state == "complete":
        bad = np.argwhere(~np.isin(grid, _CHECKED_TILES))
        status_tiles = tuple(((int(r), int(c)), TileStatus(grid[r, c]).name) for r, c in bad)
    damage, unrecorded, moved = [], [], 0
    arrays = store.checked_arrays()
    owners = _owners(store, arrays)
    for name, array in arrays.items():
        records = store.checksum_records(name)
        keys = chunk_keys(array)
        if records is None or records.shape != (len(keys), 3):
            unrecorded.append(name)
            continue
        owner = owners.get(name)
        rows = [i for i in range(len(keys)) if owner is None or grid[_tile(owner[i])] in _CHECKED_TILES]
        found, n_moved = _check(array, keys, records, rows, full)
        moved += n_moved
        damage += [Damage(name, keys[i], why, None if owner is None else _tile(owner[i])) for i, why in found]
    return Verdict(store.path, full, tuple(damage), status_tiles, tuple(unrecorded), moved=moved)


def schedule_repair(store: CheckedStore, verdict: Verdict) -> list[tuple[int, int]]:
    """Make the next run repair what ``verdict`` found (driver only, store opened "r+"):
    damaged DONE tiles back to PENDING, stray chunks of SKIPPED tiles deleted, the state
    partial with the findings kept for `segpipe status`. Returns the tiles to recompute.
    Arrays without checksums cannot be checked: every DONE tile is recomputed."""
    if verdict.ok:
        return []
    grid = store.status_grid()
    damaged = set(verdict.damaged_tiles)
    if verdict.unrecorded:
        damaged |= {(int(r), int(c)) for r, c in np.argwhere(grid == TileStatus.DONE)}
    stray = [d for d in verdict.damage if d.tile is not None and grid[d.tile] == TileStatus.SKIPPED]
    for name in {d.array for d in stray}:
        delete(store.checked_arrays()[name], [d.key for d in stray if d.array == name])
    rerun = sorted(t for t in damaged if grid[t] == TileStatus.DONE)
    if rerun:
        store.set_many([TileReport(t, TileStatus.PENDING) for t in rerun])
    store.record_damage(verdict.lines()[:DAMAGE_LINES_KEPT])
    return rerun


# -- the checks ---------------------------------------------------------------------------


def _check(array: zarr.Array, keys: list[str], records: np.ndarray, rows: list[int],
           full: bool) -> tuple[list[tuple[int, str]], int]:  # fmt: skip
    """(row, reason) of each damaged chunk among ``rows``, and how many chunks had a new
    modification marker but their recorded bytes."""
    if full:
        to_read, found = rows, []
    else:
        seen = listing(array, keys)
        to_read, found = [], []
        for i in rows:
            reason = _size_reason(records[i], seen[i].size)
            if reason:
                found.append((i, reason))
            elif records[i, SIZE] != ABSENT and (seen[i].marker == 0 or seen[i].marker != records[i, MARKER]):
                to_read.append(i)  # written since finalize, or no marker: read the bytes
    for i, data in read_many(array, keys, to_read):
        reason = _size_reason(records[i], ABSENT if data is None else len(data))
        if not reason and digest(data) != records[i, DIGEST]:
            reason = "content differs from its checksum"
        if reason:
            found.append((i, reason))
    moved = len(to_read) - len({i for i, _ in found} & set(to_read))
    return sorted(found), 0 if full else moved


def _size_reason(record: np.ndarray, size: int) -> str | None:
    recorded = int(record[SIZE])
    if recorded == ABSENT and size != ABSENT:
        return f"stored ({size} bytes) where none was written"
    if recorded != ABSENT and size == ABSENT:
        return f"missing (recorded {recorded} bytes)"
    if recorded != size:
        return f"{size} bytes, recorded {recorded}"
    return None


def _owners(store: CheckedStore, arrays: dict[str, zarr.Array]) -> dict[str, np.ndarray]:
    """Per checked array with owner tiles, each chunk record's owner (row, col): prob chunk
    (r, c) (its grid position along y and x; the channels are one chunk) is tile (r, c)'s,
    and so is chunk (r, c) of the instance keys; a full-resolution chunk is the tile's whose
    owned box holds it (OutputStore.owned_boxes, the rule write_tile enforces)."""
    lay = store.layout
    names = store.prob.metadata.dimension_names or ("y", "x", "c")  # format 1: (y, x, c)
    yx = [names.index("y"), names.index("x")]
    prob_owner = np.array([[c[i] for i in yx] for c in np.ndindex(*store.prob.cdata_shape)], np.int64)
    mask = store.mask
    mask_owner = np.full((*mask.cdata_shape, 2), -1, np.int64)
    for tile in plan_tiles(lay.work_hw, lay.tile):
        _, full = store.owned_boxes(tile)
        if not full.is_empty:
            c = lay.full_chunk
            mask_owner[full.y0 // c : -(-full.y1 // c), full.x0 // c : -(-full.x1 // c)] = tile.index
    if (mask_owner < 0).any():  # full_res_owned partitions the chunks: a broken layout
        orphan = tuple(int(i) for i in np.argwhere(mask_owner[..., 0] < 0)[0])
        raise StoreError(f"{store.path}: labels/mask/0 chunk {orphan} has no owner tile")
    owners = {store.prob_name: prob_owner, "labels/mask/0": mask_owner.reshape(-1, 2)}
    for name in lay.instances:
        keys = arrays[f"instances/{name}"]
        owners[f"instances/{name}"] = np.array(list(np.ndindex(*keys.cdata_shape)), np.int64).reshape(-1, 2)
    return owners


def _tile(owner: np.ndarray) -> tuple[int, int]:
    return (int(owner[0]), int(owner[1]))
