"""Finalizing an output store, and what a finalized store reports: ``FinalizeMixin``,
which ``OutputStore`` inherits (callers keep calling ``store.finalize()``,
``store.summary()``, ...).

Finalize is the driver's last write to an image's store, once every tile's worker is done:
1. the instance label image (labels/<name>/0) from the tiles' instance keys
   (instance_image.py), with the instance count;
2. the pyramids: mask levels 1.. (nearest), instance levels 1.. (nearest), probability
   levels 1.. (2x2 means), each from the level above, chunk by chunk (pyramid.py);
3. each checked chunk's checksum (checksums.py; verify.py reads them back);
4. the state, last: "complete" when every tile is done or skipped, else "partial". A store
   stopped before this step is not marked complete, so the next run finalizes it again.

It is its own module because it is one responsibility with its own readers: everything
here runs on the driver after the tiles, never in a worker, and touches the store only
through the host's metadata and pixel accessors (declared below for type checkers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import zarr

from pipeline.job import is_complete
from pipeline.store.checksums import measure, read_records, records_group, write_records
from pipeline.store.errors import StoreError
from pipeline.store.instance_image import write_ids
from pipeline.store.layout import StoreLayout
from pipeline.store.pyramid import build_levels, halve_mean, halve_nearest

SUMMARY_MAX_FAILED = 20

State = Literal["pending", "running", "partial", "complete"]
STATES: tuple[str, ...] = get_args(State)


class FinalizeMixin:
    """Finalize, checksums and summary of one image's output group; mixed into
    ``OutputStore`` (store.py), which provides the attributes and methods declared here."""

    path: str
    layout: StoreLayout
    _group: zarr.Group

    if TYPE_CHECKING:  # provided by OutputStore

        @property
        def mask(self) -> zarr.Array: ...
        @property
        def state(self) -> State: ...
        @property
        def provenance(self) -> dict[str, Any]: ...
        def mask_level(self, k: int) -> zarr.Array: ...
        def mask_levels(self) -> dict[str, zarr.Array]: ...
        def instance_levels(self) -> dict[str, zarr.Array]: ...
        def prob_levels(self) -> dict[str, zarr.Array]: ...
        def instance_level(self, k: int) -> zarr.Array: ...
        def status_grid(self) -> np.ndarray: ...
        def failures(self) -> dict[tuple[int, int], dict[str, Any]]: ...
        def counts(self) -> dict[str, int]: ...
        def mark_state(self, state: State) -> None: ...
        def _meta(self) -> dict[str, Any]: ...
        def _update_meta(self, **changes: Any) -> None: ...
        def _read(self, name: str, array: zarr.Array, selection: Any) -> np.ndarray: ...
        def _check_writable(self) -> None: ...

    def finalize(self) -> State:
        """Build the mask and probability pyramids, record every chunk's checksum, then
        write the state, last: "complete" when every tile is done or skipped, else
        "partial" (failed or never-run tiles remain)."""
        self._check_writable()
        self.build_instances()
        self.build_pyramid()
        self.record_checksums()
        state: State = "complete" if is_complete(self.status_grid()) else "partial"
        self.mark_state(state)
        return state

    def build_pyramid(self) -> None:
        """Fill levels 1.. of the mask (every 2nd pixel: labels stay labels) and of the
        probabilities (2x2 means), each from the level above, chunk by chunk (pyramid.py)."""
        build_levels(self.mask_levels(), halve_nearest, self.path)
        build_levels(self.instance_levels(), halve_nearest, self.path)  # {} without instances
        build_levels(self.prob_levels(), halve_mean, self.path)

    def build_instances(self) -> None:
        """Map the tiles' instance keys to ids 1..n unique per image (pipeline.instances) in
        labels/<name>/0, chunk by chunk, nearest-upsampled where the mask is foreground, and
        record n. Driver only; redone whole at every finalize (a resumed run's new tiles
        change the keys), so it is idempotent. Memory: the sorted keys and a chunk."""
        if not self.layout.instances:
            return
        name = self.layout.instances[0]
        try:
            count = write_ids(self._group[f"instances/{name}"], self.mask, self.instance_level(0), self.layout)
        except (RuntimeError, ValueError) as exc:  # numcodecs' zstd raises RuntimeError
            raise StoreError(f"{self.path}: instances/{name} or labels/mask/0 does not decode ({exc})") from exc
        self._update_meta(instances={name: count})

    def instance_counts(self) -> dict[str, int] | None:
        """Instances per image by name (finalize records them); None: no instance image."""
        return self._meta().get("instances") if self.layout.instances else None

    # -- verification (pipeline/store/verify.py) ---------------------------------------------

    def checked_arrays(self) -> dict[str, zarr.Array]:
        """The arrays whose chunks carry checksums, by path: every probability level and
        every mask level (the first of each has owner tiles, verify.py), and with instances
        the tiles' keys (tile-owned like prob/0) and every level of the instance image
        (made by finalize from the keys, as the pyramids are)."""
        keys = {f"instances/{n}": self._group[f"instances/{n}"] for n in self.layout.instances}
        return {**self.prob_levels(), **self.mask_levels(), **keys, **self.instance_levels()}  # type: ignore[dict-item]

    def record_checksums(self) -> None:
        """Record each checked chunk's digest, size and modification marker (driver only,
        at finalize, once every tile's worker is done writing); clears recorded damage."""
        checks = records_group(self._group)  # required once, not per array
        for name, array in self.checked_arrays().items():
            write_records(checks, name, measure(array))
        if "damage" in self._meta():
            meta = self._meta()
            del meta["damage"]
            self._group.attrs.update({"segpipe": meta})

    def checksum_records(self, name: str) -> np.ndarray | None:
        """The checksums finalize recorded for array ``name`` (None: never recorded)."""
        return read_records(self._group, name)

    def record_damage(self, lines: list[str]) -> None:
        """Mark the store partial with the damage found, for `segpipe status` (driver)."""
        self._update_meta(state="partial", damage=list(lines))

    # -- the report ---------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """A small JSON-able report: shapes, state, counts, failed tiles, mask fractions."""
        failed = sorted(self.failures().items())
        lay = self.layout
        damage = list(self._meta().get("damage", []))
        try:
            fractions = self._mask_fraction()
        except StoreError as exc:  # a status listing goes on; the store is named as damaged
            fractions, damage = None, [*damage, str(exc)]
        return {
            "image_id": lay.image_id,
            "path": self.path,
            "state": self.state,
            "full_hw": list(lay.full_hw),
            "work_hw": list(lay.work_hw),
            "tile": lay.tile,
            "grid": list(lay.grid),
            "classes": list(lay.classes),
            "mpp": lay.mpp,
            "counts": self.counts(),
            "failed": [{"tile": list(i), **f} for i, f in failed[:SUMMARY_MAX_FAILED]],
            "failed_total": len(failed),
            "mask_fraction": fractions,
            "damage": damage,
            "qc": self.provenance.get("qc"),  # the QC verdict (pipeline.qc), once complete
            "instances": self.instance_counts(),  # e.g. {"nuclei": 812}; None: no instance image
        }

    def _mask_fraction(self) -> dict[str, float] | None:
        """Per-class area fraction from the coarsest pyramid level (None before finalize)."""
        if self.state not in ("partial", "complete"):
            return None
        top = len(self.layout.levels) - 1
        labels = self._read(f"labels/mask/{top}", self.mask_level(top), ...)
        counts = np.bincount(labels.ravel(), minlength=len(self.layout.classes) + 1)
        return {
            name: round(float(counts[i]) / labels.size, 6)
            for i, name in enumerate(self.layout.classes, start=1)
        }
