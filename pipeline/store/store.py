"""The ``OutputStore``: one image's output group, opened or created, with its metadata,
pixels, status grid and completion state. The layout it creates and reads is described in
layout.py; finalize, checksums and summary are finalize.py's (``FinalizeMixin``, inherited).

Writers: workers call only ``write_tile``, ``write_mask_piece`` and ``write_instance_keys``,
which write the tile's own chunks of ``prob/0``, ``labels/mask/0`` and ``instances/<name>``
and never metadata; ``labels/<name>`` is written by finalize (instance_image.py).
Everything else (status, provenance, state, pyramids, picture, chunk checksums) is written
by the driver alone, so no object has two writers. A format-1 store (layout.py) is read, never written.

Reads of pixels go through ``_read``: a chunk that does not decode (a zstd error deep in
zarr) becomes one StoreError naming the store, the array and the chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr
import zarr.errors

from pipeline.config import ProbDtype
from pipeline.display import Window
from pipeline.engine.tiling import Box, Tile, full_res_owned
from pipeline.job import TileReport, is_complete
from pipeline.store.checksums import decode_error
from pipeline.store.errors import NotAStoreError, StoreError
from pipeline.store.finalize import STATES, FinalizeMixin, State
from pipeline.store.layout import (
    COMPRESSORS,
    FORMAT,
    READABLE_FORMATS,
    StoreLayout,
    create_layout,
)
from pipeline.store.names import store_location
from pipeline.store.picture import picture_written, write_picture
from pipeline.store.provenance import as_json, check_provenance, identity, versions
from pipeline.store.status import StatusGrid
from pipeline.store.tile_checks import check_mask, check_piece, encode_prob

log = logging.getLogger(__name__)


class OutputStore(FinalizeMixin):
    """One image's output group. The driver uses ``create_or_open``; workers and readers
    use ``open`` (mode "r+" to write tiles, "r" to read)."""

    def __init__(self, group: zarr.Group, path: str) -> None:
        meta = group.attrs.get("segpipe")
        if not isinstance(meta, Mapping) or meta.get("format") not in READABLE_FORMATS:
            raise NotAStoreError(f"{path}: not a segpipe output store (format {FORMAT})")
        self.path = path
        self._group = group
        self.format: int = meta["format"]
        self.layout = StoreLayout.from_dict(meta["layout"])
        # the working-level probabilities: (C, h, w) at prob/0; format 1: (h, w, C) at prob
        self.prob_name = "prob/0" if self.format == FORMAT else "prob"
        try:
            self.prob: zarr.Array = group[self.prob_name]  # type: ignore[assignment]
            self._status: zarr.Array = group["status"]  # type: ignore[assignment]
            self._seconds: zarr.Array = group["tile_seconds"]  # type: ignore[assignment]
        except KeyError as exc:
            raise StoreError(f"{path}: damaged output store, no {exc} array; remove it to run again") from exc
        self._grid = StatusGrid(self._status, self._seconds, path)

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        *,
        image_id: str,
        full_hw: tuple[int, int],
        work_hw: tuple[int, int],
        tile: int,
        full_chunk: int,
        classes: Sequence[str],
        prob_dtype: ProbDtype = "uint8",
        mpp: float | None = None,
        instances: Sequence[str] = (),
        provenance: Mapping[str, Any],
        overwrite: bool = False,
    ) -> OutputStore:
        """Create the store, or open the existing one when it matches (resume: nothing wiped).

        ``provenance`` holds safe metadata only: ``input`` (path, sha256), ``model``
        (sha256, card), ``run`` (RunConfig.to_dict()), ``timings``, ...; versions are
        added here. An existing store with other shapes, input, model or pixel settings
        raises StoreError unless ``overwrite``, which replaces a segpipe store made differently
        (the same output is resumed either way).
        """
        where = store_location(path)
        layout = StoreLayout(
            image_id, tuple(full_hw), tuple(work_hw), tile, full_chunk,  # type: ignore[arg-type]
            tuple(classes), prob_dtype, mpp, tuple(instances),
        )  # fmt: skip
        check_provenance(provenance, where)
        record = as_json(dict(provenance), where)
        record["versions"] = {**versions(), **record.get("versions", {})}
        existing = _open_group(where, "r+")
        if existing is not None:
            store = cls(existing, where)  # refuses a group that is not ours: never wiped
            diffs = store._differences(layout, record)
            if diffs and not overwrite:
                raise StoreError(
                    f"{where}: existing output differs: {'; '.join(diffs)}; "
                    "run with --overwrite (RunConfig overwrite=True) to replace it"
                )
            if not diffs and store.format == FORMAT:  # the same output: resume it
                log.info("%s: resuming, %s", where, store.counts())
                return store
            if not diffs:  # the same output in an older layout: made again in this one
                log.warning("%s: output in store format %d, run again in format %d", where, store.format, FORMAT)
            else:
                log.warning("%s: overwriting the existing output (%s)", where, "; ".join(diffs))
        group = zarr.open_group(where, mode="w", zarr_format=3)
        create_layout(group, layout, record)
        return cls(group, where)

    @classmethod
    def open(cls, path: str | Path, *, mode: Literal["r", "r+"] = "r") -> OutputStore:
        """Open an existing store: "r" for status and summaries, "r+" for workers' writes."""
        where = store_location(path)
        group = _open_group(where, mode)
        if group is None:
            raise NotAStoreError(f"{where}: no output store there")
        return cls(group, where)

    def _differences(self, layout: StoreLayout, record: Mapping[str, Any]) -> list[str]:
        stored_layout, new_layout = self.layout.to_dict(), layout.to_dict()
        stored_id, new_id = identity(self.provenance), identity(record)
        return [
            f"{k}: stored {old[k]!r}, requested {new[k]!r}"
            for old, new in ((stored_layout, new_layout), (stored_id, new_id))
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]

    # -- metadata -----------------------------------------------------------------------

    @property
    def image_id(self) -> str:
        return self.layout.image_id

    @property
    def outdated(self) -> bool:
        """Made in an older store format: read, never written; a run makes it again."""
        return self.format != FORMAT

    @property
    def state(self) -> State:
        return self._meta()["state"]

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._meta()["provenance"])

    def update_provenance(self, section: str, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into one provenance section (e.g. "timings"). Driver only."""
        check_provenance({section: values}, self.path)
        prov = self.provenance
        prov[section] = {**prov.get(section, {}), **as_json(dict(values), self.path)}
        self._update_meta(provenance=prov)

    def _meta(self) -> dict[str, Any]:
        return dict(self._group.attrs["segpipe"])  # type: ignore[arg-type]

    def _update_meta(self, **changes: Any) -> None:
        self._group.attrs.update({"segpipe": {**self._meta(), **changes}})

    # -- pixels -------------------------------------------------------------------------

    @property
    def mask(self) -> zarr.Array:
        """The label image at full resolution (pyramid level 0)."""
        return self.mask_level(0)

    def mask_level(self, k: int) -> zarr.Array:
        """Pyramid level k: level 0 downsampled by 2^k (filled by ``finalize``)."""
        if not 0 <= k < len(self.layout.levels):
            raise StoreError(f"{self.path}: no mask level {k}, have {len(self.layout.levels)}")
        try:
            return self._group[f"labels/mask/{k}"]  # type: ignore[return-value]
        except KeyError as exc:
            raise StoreError(f"{self.path}: damaged output store, no labels/mask/{k} array") from exc

    def owned_boxes(self, tile: Tile) -> tuple[Box, Box]:
        """The tile's own chunks: its working-level box in ``prob`` and full-res box in ``mask``."""
        r, c = self._grid.check_index(tile.index)
        t, (h, w) = self.layout.tile, self.layout.work_hw
        work = Box(r * t, c * t, min((r + 1) * t, h), min((c + 1) * t, w))
        own = Tile((r, c), work, t)
        lay = self.layout
        return work, full_res_owned(own, lay.work_hw, lay.full_hw, lay.full_chunk)

    def write_tile(
        self, tile: Tile, prob_work: np.ndarray, mask_full: np.ndarray | None, full_box: Box
    ) -> None:
        """Write one tile's probabilities and full-resolution mask into its own chunks.

        Invariant 1 is checked, not assumed: ``tile.region`` must be prob chunk ``tile.index``
        and ``full_box`` the full-res chunks the tile owns (it may be empty). Rewriting
        the same tile writes the same bytes. ``mask_full`` None: the mask is written in
        pieces by ``write_mask_piece`` (the engine's way: the full-res box grows with the
        model's scale, a piece does not).
        """
        self._check_writable()
        work, full = self.owned_boxes(tile)
        where = f"{self.path}: tile {tile.index}"
        if tile.region != work:
            raise StoreError(f"{where}: region {tile.region} is not its prob chunk {work}")
        if full_box != full:
            raise StoreError(f"{where}: full_box {full_box} is not its own mask chunks {full}")
        prob = encode_prob(prob_work, work, self.layout, where)
        mask = None if mask_full is None else check_mask(mask_full, full, self.layout, where)
        self.prob[:, work.y0 : work.y1, work.x0 : work.x1] = prob
        if mask is not None and not full.is_empty:
            self.mask[full.y0 : full.y1, full.x0 : full.x1] = mask

    def write_mask_piece(self, tile: Tile, box: Box, mask: np.ndarray) -> None:
        """Write whole chunks ``box`` of the tile's own full-resolution mask chunks (a tile
        may own several; tile_checks.check_piece says which boxes it may write)."""
        self._check_writable()
        _, full = self.owned_boxes(tile)
        where = f"{self.path}: tile {tile.index}"
        check_piece(box, full, self.layout, where)
        self.mask[box.y0 : box.y1, box.x0 : box.x1] = check_mask(mask, box, self.layout, where)

    def write_instance_keys(self, tile: Tile, keys: np.ndarray) -> None:
        """Write one tile's instance keys (pipeline.instances) into its own chunk of
        instances/<name>: the tile's working-level region, like its prob chunk."""
        self._check_writable()
        work, _ = self.owned_boxes(tile)
        where = f"{self.path}: tile {tile.index}"
        if not self.layout.instances:
            raise StoreError(f"{where}: this output has no instance image")
        if keys.shape != work.shape or keys.dtype != np.uint32:
            raise StoreError(f"{where}: instance keys {keys.shape} {keys.dtype}, expected {work.shape} uint32")
        self._group[f"instances/{self.layout.instances[0]}"][work.y0 : work.y1, work.x0 : work.x1] = keys

    def instance_level(self, k: int) -> zarr.Array:
        """Level k of the instance label image (labels/<name>/k, written by finalize)."""
        if not self.layout.instances:
            raise StoreError(f"{self.path}: this output has no instance image")
        return self._group[f"labels/{self.layout.instances[0]}/{k}"]  # type: ignore[return-value]

    def read_prob(self, box: Box | None = None) -> np.ndarray:
        """Probabilities of a working-level box as float32 in [0, 1], (h, w, C)."""
        b = box or Box(0, 0, *self.layout.work_hw)
        axes = {"y": slice(b.y0, b.y1), "x": slice(b.x0, b.x1), "c": slice(None)}
        names = self.prob.metadata.dimension_names or ("y", "x", "c")  # format 1: (y, x, c)
        raw = self._read(self.prob_name, self.prob, tuple(axes[n] for n in names))
        raw = np.moveaxis(raw, names.index("c"), -1)
        if self.layout.prob_dtype == "uint8":
            return raw.astype(np.float32) / np.float32(255.0)
        return raw.astype(np.float32)

    def write_picture(self, source: da.Array, window: Window) -> None:
        """Write the input's picture, the group's NGFF image (picture.py), from a lazy
        (h, w, C) view of it at the shape of mask level ``layout.picture_from``, through
        the display ``window``. Driver only."""
        self._check_writable()
        write_picture(self._group, source, window, self.layout, self.path)

    def has_picture(self) -> bool:
        """Whether the picture was written whole (ingest writes it once)."""
        return picture_written(self._group)

    def write_preview(self, image: np.ndarray) -> None:
        """Keep the input's colour thumbnail (h, w, C) uint8 for tissue detection and
        overlays (viewers show the picture, write_picture)."""
        arr = self._group.create_array(
            "preview", shape=image.shape, dtype=np.uint8, chunks=image.shape,
            compressors=COMPRESSORS, overwrite=True,
        )  # fmt: skip
        arr[...] = image

    def has_preview(self) -> bool:
        """Whether ingest wrote the preview (one metadata read, not a listing of the group)."""
        return "preview" in self._group

    def preview(self) -> np.ndarray:
        """The colour thumbnail written at ingest."""
        if "preview" not in self._group:
            raise StoreError(f"{self.path}: no preview; the image was not ingested")
        return self._read("preview", self._group["preview"], ...)  # type: ignore[arg-type]

    def _read(self, name: str, array: zarr.Array, selection: Any) -> np.ndarray:
        """``array[selection]``; a chunk that does not decode is a StoreError naming it."""
        try:
            return np.asarray(array[selection])
        except (RuntimeError, ValueError) as exc:  # numcodecs' zstd raises RuntimeError
            raise decode_error(self.path, name, array, exc, selection) from exc

    # -- tile status (driver only) --------------------------------------------------------

    def status_grid(self) -> np.ndarray:
        """The tile grid of TileStatus values (uint8)."""
        return self._grid.grid()

    def failures(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Failed tiles: index -> {"error", "attempts"}."""
        return self._grid.failures()

    def set_many(self, reports: Iterable[TileReport]) -> None:
        """Record many tiles in one write per object; a FAILED report needs its error
        (see StatusGrid.set_many). The driver is the only writer."""
        self._grid.set_many(reports)

    def tiles_to_run(self, all_tiles: Iterable[Tile]) -> list[Tile]:
        """The tiles a (re-)run must still compute: PENDING or FAILED."""
        return self._grid.tiles_to_run(all_tiles)

    def counts(self) -> dict[str, int]:
        """Tiles per status, by lower-case name, plus "total"."""
        return self._grid.counts()

    def mark_state(self, state: State) -> None:
        """Set the completion state; "complete" only when every tile is done or skipped."""
        if state not in STATES:
            raise StoreError(f"{self.path}: unknown state {state!r}, expected one of {STATES}")
        if state == "complete" and not is_complete(self.status_grid()):
            raise StoreError(f"{self.path}: cannot mark complete, tiles left: {self.counts()}")
        self._update_meta(state=state)

    def mask_levels(self) -> dict[str, zarr.Array]:
        """Every mask level by path, full resolution first."""
        return {f"labels/mask/{k}": self.mask_level(k) for k in range(len(self.layout.levels))}

    def instance_levels(self) -> dict[str, zarr.Array]:
        """Every level of the instance label image by path, full resolution first ({}
        without one)."""
        if not self.layout.instances:
            return {}
        name = self.layout.instances[0]
        return {f"labels/{name}/{k}": self.instance_level(k) for k in range(len(self.layout.levels))}

    def prob_levels(self) -> dict[str, zarr.Array]:
        """Every probability level by path, the working level first (format 1: one)."""
        if self.outdated:
            return {self.prob_name: self.prob}
        names = [f"prob/{k}" for k in range(len(self.layout.prob_levels))]
        try:
            return {n: self._group[n] for n in names}  # type: ignore[misc]
        except KeyError as exc:
            raise StoreError(f"{self.path}: damaged output store, no {exc} array") from exc

    def _check_writable(self) -> None:
        if self.outdated:
            raise StoreError(f"{self.path}: an output in store format {self.format} is read only; "
                             f"run the image again to make it in format {FORMAT}")  # fmt: skip


def _open_group(where: str, mode: Literal["r", "r+"]) -> zarr.Group | None:
    """The zarr group at ``where``, or None when nothing is there."""
    try:
        return zarr.open_group(where, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except zarr.errors.ContainsArrayError as exc:
        raise NotAStoreError(f"{where}: holds a zarr array, not an output store") from exc
