"""The status grid of a store: one TileStatus per tile (``status``), each failed tile's
error and attempt count (its ``failures`` attribute) and the seconds each tile took
(``tile_seconds``). The driver is their only writer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr

from pipeline.engine.tiling import Tile
from pipeline.job import TileReport, TileStatus
from pipeline.store.errors import StoreError

ERROR_MAX_CHARS = 1000  # error text kept per failed tile; the status attributes stay small


class StatusGrid:
    """Reads and records tile states in a store's ``status`` and ``tile_seconds`` arrays."""

    def __init__(self, status: zarr.Array, seconds: zarr.Array, where: str) -> None:
        self._status = status
        self._seconds = seconds
        self.where = where

    def grid(self) -> np.ndarray:
        """The tile grid of TileStatus values (uint8)."""
        return np.asarray(self._status[...])

    def failures(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Failed tiles: index -> {"error", "attempts"}."""
        raw = self._status.attrs.get("failures", {})
        return {_parse_key(k): dict(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def set_many(self, reports: Iterable[TileReport]) -> None:
        """Record many tiles in one write per object.

        A FAILED report needs its error; any other status clears the tile's failure.
        The grid is written last, so a tile reads DONE/FAILED only once its details are.
        """
        grid, seconds = self.grid(), None
        before = self._status.attrs.get("failures", {})
        failures = dict(before)  # type: ignore[call-overload]
        for rep in reports:
            r, c = self.check_index(rep.index)
            status, key = TileStatus(rep.status), f"{r},{c}"
            if status is TileStatus.FAILED:
                if not rep.error:
                    raise StoreError(f"{self.where}: tile {rep.index} FAILED without an error")
                error = rep.error[:ERROR_MAX_CHARS]
                failures[key] = {"error": error, "attempts": rep.attempts or 1}
            else:
                failures.pop(key, None)
            if rep.seconds is not None:
                seconds = np.asarray(self._seconds[...]) if seconds is None else seconds
                seconds[r, c] = rep.seconds
            grid[r, c] = status
        if failures != before:
            self._status.attrs.update({"failures": failures})
        if seconds is not None:
            self._seconds[...] = seconds
        self._status[...] = grid

    def tiles_to_run(self, all_tiles: Iterable[Tile]) -> list[Tile]:
        """The tiles a (re-)run must still compute: PENDING or FAILED."""
        grid = self.grid()
        todo = (TileStatus.PENDING, TileStatus.FAILED)
        return [t for t in all_tiles if grid[self.check_index(t.index)] in todo]

    def counts(self) -> dict[str, int]:
        """Tiles per status, by lower-case name, plus "total"."""
        n = np.bincount(self.grid().ravel(), minlength=len(TileStatus))
        return {s.name.lower(): int(n[s]) for s in TileStatus} | {"total": int(n.sum())}

    def check_index(self, index: tuple[int, int]) -> tuple[int, int]:
        """``index`` as ints; StoreError when it lies outside the grid."""
        r, c = (int(i) for i in index)
        rows, cols = self._status.shape
        if not (0 <= r < rows and 0 <= c < cols):
            raise StoreError(f"{self.where}: tile {index} outside the {rows}x{cols} grid")
        return r, c


def _parse_key(key: str) -> tuple[int, int]:
    r, c = key.split(",")
    return int(r), int(c)
