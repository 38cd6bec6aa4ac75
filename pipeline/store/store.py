"""The output store of one image: a zarr v3 group that viewers open as OME-Zarr.

Layout of ``OUT/<image-id>.zarr`` (OME-NGFF 0.5, the NGFF version defined on zarr v3: 0.4's
multiscales / labels metadata under an ``ome`` attribute):

    zarr.json          ``ome``: the thumbnail's multiscales (once ingest wrote it);
                       ``segpipe``: format, layout, provenance and the completion ``state``
    0, 1, ...          grey thumbnail pyramid of the input, so viewers show the image
    labels/            ``ome.labels == ["mask"]``
    labels/mask/0      uint8 label image at the input's full resolution, 0 = background,
                       1..C = classes; square chunks of ``full_chunk``; the chunks tile
                       (r, c) owns are ``tiling.full_res_owned`` (invariant 1)
    labels/mask/1...   x2 nearest-neighbour downsamples until the long side <= 1024
    prob               class probabilities at the working level, (y, x, c), chunks
                       (tile, tile, C): chunk (r, c) is tile (r, c)'s. uint8 holds
                       round(p * 255); one channel per foreground class (one class: the
                       foreground probability). float16 / float32 store p itself.
    status             uint8 tile grid of TileStatus; its ``failures`` attribute holds each
                       failed tile's error and attempt count
    tile_seconds       float32 tile grid: seconds each tile took (NaN: not recorded)

No array is sharded: a zarr 3 shard written by two processes loses pixels.

Writers: workers call only ``write_tile``, which writes the tile's own chunks of ``prob``
and ``labels/mask/0`` and never metadata. Everything else (status, provenance, state,
pyramid, thumbnail) is written by the driver alone, so no object has two writers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import dask.array as da
import numpy as np
import zarr
import zarr.errors
from skimage.transform import pyramid_reduce
from zarr.codecs import ZstdCodec

from pipeline.config import ProbDtype, pixel_settings
from pipeline.engine.tiling import Box, Tile, full_res_owned, grid_shape
from pipeline.errors import SegpipeError
from pipeline.job import TileReport, TileStatus, is_complete

log = logging.getLogger(__name__)

FORMAT = 1
NGFF_VERSION = "0.5"
PYRAMID_MAX_SIDE = 1024  # the mask pyramid stops at the first level this small
THUMBNAIL_MAX_SIDE = 4096  # write_thumbnail holds the thumbnail in memory
THUMBNAIL_MIN_SIDE = 256
ERROR_MAX_CHARS = 1000  # error text kept per failed tile; the status attributes stay small
SUMMARY_MAX_FAILED = 20

PROB_DTYPES: tuple[str, ...] = get_args(ProbDtype)
State = Literal["pending", "running", "partial", "complete"]
STATES: tuple[str, ...] = ("pending", "running", "partial", "complete")

# A fixed codec, not zarr's configurable default: a rewritten tile gives identical bytes.
_COMPRESSORS = (ZstdCodec(level=3),)
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
)  # fmt: skip


class StoreError(SegpipeError, ValueError):
    """An output store does not match the request, or a write would break invariant 1."""


# ---------------------------------------------------------------------------------------
# Output names


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
    if "://" in text:  # an fsspec URL names its object already; nothing to resolve
        key, name = text, PurePosixPath(text.split("://", 1)[1]).name
    else:
        path = Path(text).expanduser().resolve()
        key, name = path.as_posix(), path.name
        if root is not None:
            base = Path(root).expanduser().resolve()
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
    root = str(out_root)
    if "://" in root:
        return f"{root.rstrip('/')}/{image_id}.zarr"
    return str(Path(root) / f"{image_id}.zarr")


# ---------------------------------------------------------------------------------------
# Provenance


# DICOM attributes that identify a patient, visit or staff member (PS3.15 Annex E, the
# common ones), as keywords and as tags; compared on lower-case alphanumerics so that
# "patient_name", "PatientName" and "(0010,0010)" all match.
_IDENTIFIER_KEYS = frozenset(
    re.sub(r"[^a-z0-9]", "", k.lower())
    for k in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
        "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientIDs",
        "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
        "MedicalRecordLocator", "AccessionNumber", "StudyID", "StudyInstanceUID",
        "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "StudyTime", "AcquisitionDateTime",
        "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
        "PerformingPhysicianName", "PhysiciansOfRecord", "RequestingPhysician",
        "OperatorsName", "DeviceSerialNumber", "EthnicGroup", "Occupation", "MilitaryRank",
        "AdmissionID", "(0010,0010)", "(0010,0020)", "(0010,0030)", "(0008,0050)",
        "(0020,000D)", "(0020,000E)", "(0008,0018)",
    )
)  # fmt: skip
# Every Patient* attribute (age, sex, size, ...) describes the person: none belongs here.
_IDENTIFIER_PREFIX = "patient"


def check_provenance(provenance: Mapping[str, Any], where: str) -> None:
    """Refuse provenance holding a patient-identifier key at any depth (StoreError)."""
    found = _identifier_keys(provenance)
    if found:
        raise StoreError(
            f"{where}: provenance holds patient identifier keys {sorted(set(found))}; "
            "pass only safe metadata"
        )


def _identifier_keys(obj: Any) -> list[str]:
    if isinstance(obj, Mapping):
        own = [str(k) for k in obj if _is_identifier(str(k))]
        return own + [k for v in obj.values() for k in _identifier_keys(v)]
    if isinstance(obj, list | tuple):
        return [k for v in obj for k in _identifier_keys(v)]
    return []


def _is_identifier(key: str) -> bool:
    norm = re.sub(r"[^a-z0-9]", "", key.lower())
    return norm in _IDENTIFIER_KEYS or norm.startswith(_IDENTIFIER_PREFIX)


def _as_json(value: Any, where: str) -> Any:
    """A JSON round trip: tuples become lists, so stored and requested values compare equal."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{where}: provenance is not JSON-able: {exc}") from exc


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("segpipe", "torch", "zarr", "numpy", "dask"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _identity(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs' pixels comparable: input and model hashes, pixel settings."""
    run = provenance.get("run") or {}
    return {
        "input.sha256": (provenance.get("input") or {}).get("sha256"),
        "model.sha256": (provenance.get("model") or {}).get("sha256"),
        **{f"run.{k}": v for k, v in pixel_settings(run).items()},
    }


def same_output(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> bool:
    """Whether an output with provenance ``stored`` is what a run with provenance
    ``requested`` ({"input": {"sha256"}, "model": {"sha256"}, "run": settings}) would write:
    same input and model hashes and pixel settings; execution-only settings may differ."""
    return _identity(stored) == _identity(_as_json(dict(requested), "requested provenance"))


# ---------------------------------------------------------------------------------------
# Layout: shapes and NGFF metadata (pure)


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and settings of one image's output; fixed when the store is created."""

    image_id: str
    full_hw: tuple[int, int]
    work_hw: tuple[int, int]
    tile: int
    full_chunk: int
    classes: tuple[str, ...]
    prob_dtype: ProbDtype = "uint8"
    mpp: float | None = None  # micrometres per pixel at full resolution

    def __post_init__(self) -> None:
        where = f"{self.image_id}"
        if min(self.full_hw) < 1 or min(self.work_hw) < 1:
            raise StoreError(f"{where}: shapes must be positive, {self.full_hw=} {self.work_hw=}")
        if self.tile < 1 or self.full_chunk < 1:
            raise StoreError(f"{where}: chunks must be positive, {self.tile=} {self.full_chunk=}")
        if not 1 <= len(self.classes) <= 255:
            raise StoreError(f"{where}: need 1..255 classes in a uint8 mask, {self.classes=}")
        if self.prob_dtype not in PROB_DTYPES:
            raise StoreError(f"{where}: prob_dtype not in {PROB_DTYPES}, {self.prob_dtype=}")
        if self.mpp is not None and not self.mpp > 0:
            raise StoreError(f"{where}: mpp must be positive or None, {self.mpp=}")

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.work_hw, self.tile)

    @property
    def levels(self) -> list[tuple[int, int]]:
        """Shapes of the mask pyramid, full resolution first."""
        return pyramid_shapes(self.full_hw)

    @property
    def scale(self) -> tuple[float, float]:
        """Full-resolution pixels per working-level pixel, per axis."""
        return (self.full_hw[0] / self.work_hw[0], self.full_hw[1] / self.work_hw[1])

    def to_dict(self) -> dict[str, Any]:
        return {**_as_json(asdict(self), self.image_id), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreLayout:
        return cls(
            image_id=d["image_id"],
            full_hw=tuple(d["full_hw"]),  # type: ignore[arg-type]
            work_hw=tuple(d["work_hw"]),  # type: ignore[arg-type]
            tile=d["tile"],
            full_chunk=d["full_chunk"],
            classes=tuple(d["classes"]),
            prob_dtype=d["prob_dtype"],
            mpp=d["mpp"],
        )


def pyramid_shapes(
    full_hw: tuple[int, int], max_side: int = PYRAMID_MAX_SIDE
) -> list[tuple[int, int]]:
    """Level k is level k-1 halved (rounding up), until the long side is <= max_side."""
    shapes = [(int(full_hw[0]), int(full_hw[1]))]
    while max(shapes[-1]) > max_side:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def ngff_multiscales(
    name: str, mpp: float | None, scales: Sequence[tuple[float, float]]
) -> list[dict[str, Any]]:
    """NGFF ``multiscales``: axes y, x (micrometre when mpp is known), one scale per level.

    ``scales`` are full-resolution pixels per level pixel; times mpp they are micrometres.
    """
    unit = {"unit": "micrometer"} if mpp else {}
    px = mpp or 1.0
    return [
        {
            "name": name,
            "axes": [{"name": a, "type": "space", **unit} for a in ("y", "x")],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [sy * px, sx * px]}
                    ],
                }
                for k, (sy, sx) in enumerate(scales)
            ],
        }
    ]


def ngff_image_label(classes: Sequence[str]) -> dict[str, Any]:
    """NGFF ``image-label``: transparent background, a palette colour and a name per class."""
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colors += [
        {"label-value": i, "rgba": [*_PALETTE[(i - 1) % len(_PALETTE)], 255]}
        for i in range(1, len(classes) + 1)
    ]
    properties = [{"label-value": i, "class": n} for i, n in enumerate(classes, start=1)]
    return {"colors": colors, "properties": properties, "source": {"image": "../../"}}


def _level_chunks(full_chunk: int, shape: tuple[int, int]) -> tuple[int, int]:
    side = min(full_chunk, PYRAMID_MAX_SIDE)
    return (min(side, shape[0]), min(side, shape[1]))


# ---------------------------------------------------------------------------------------
# The store


class OutputStore:
    """One image's output group. The driver uses ``create_or_open``; workers and readers
    use ``open`` (mode "r+" to write tiles, "r" to read)."""

    def __init__(self, group: zarr.Group, path: str) -> None:
        meta = group.attrs.get("segpipe")
        if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
            raise StoreError(f"{path}: not a segpipe output store (format {FORMAT})")
        self.path = path
        self._group = group
        self.layout = StoreLayout.from_dict(meta["layout"])
        self.prob: zarr.Array = group["prob"]  # type: ignore[assignment]
        self._status: zarr.Array = group["status"]  # type: ignore[assignment]
        self._seconds: zarr.Array = group["tile_seconds"]  # type: ignore[assignment]

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
        provenance: Mapping[str, Any],
        overwrite: bool = False,
    ) -> OutputStore:
        """Create the store, or open the existing one when it matches (resume: nothing wiped).

        ``provenance`` holds safe metadata only: ``input`` (path, sha256), ``model``
        (sha256, card), ``run`` (RunConfig.to_dict()), ``timings``, ...; versions are
        added here. An existing store with other shapes, input, model or pixel settings
        raises StoreError unless ``overwrite``, which replaces any segpipe store there.
        """
        where = _location(path)
        layout = StoreLayout(
            image_id, tuple(full_hw), tuple(work_hw), tile, full_chunk,  # type: ignore[arg-type]
            tuple(classes), prob_dtype, mpp,
        )  # fmt: skip
        check_provenance(provenance, where)
        record = _as_json(dict(provenance), where)
        record["versions"] = {**_versions(), **record.get("versions", {})}
        existing = _open_group(where, "r+")
        if existing is not None:
            store = cls(existing, where)  # refuses a group that is not ours: never wiped
            diffs = store._differences(layout, record)
            if not overwrite and diffs:
                raise StoreError(
                    f"{where}: existing output differs: {'; '.join(diffs)}; "
                    "pass overwrite to replace it"
                )
            if not overwrite:
                log.info("%s: resuming, %s", where, store.counts())
                return store
            log.warning("%s: overwriting the existing output", where)
        group = zarr.open_group(where, mode="w", zarr_format=3)
        _create_layout(group, layout, record)
        return cls(group, where)

    @classmethod
    def open(cls, path: str | Path, *, mode: Literal["r", "r+"] = "r") -> OutputStore:
        """Open an existing store: "r" for status and summaries, "r+" for workers' writes."""
        where = _location(path)
        group = _open_group(where, mode)
        if group is None:
            raise StoreError(f"{where}: no output store there")
        return cls(group, where)

    def _differences(self, layout: StoreLayout, record: Mapping[str, Any]) -> list[str]:
        stored_layout, new_layout = self.layout.to_dict(), layout.to_dict()
        stored_id, new_id = _identity(self.provenance), _identity(record)
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
    def state(self) -> State:
        return self._meta()["state"]

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self._meta()["provenance"])

    def update_provenance(self, section: str, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into one provenance section (e.g. "timings"). Driver only."""
        check_provenance({section: values}, self.path)
        prov = self.provenance
        prov[section] = {**prov.get(section, {}), **_as_json(dict(values), self.path)}
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
        return self._group[f"labels/mask/{k}"]  # type: ignore[return-value]

    def owned_boxes(self, tile: Tile) -> tuple[Box, Box]:
        """The tile's own chunks: its working-level box in ``prob`` and full-res box in ``mask``."""
        r, c = self._check_index(tile.index)
        t, (h, w) = self.layout.tile, self.layout.work_hw
        work = Box(r * t, c * t, min((r + 1) * t, h), min((c + 1) * t, w))
        own = Tile((r, c), work, t)
        lay = self.layout
        return work, full_res_owned(own, lay.work_hw, lay.full_hw, lay.full_chunk)

    def write_tile(
        self, tile: Tile, prob_work: np.ndarray, mask_full: np.ndarray, full_box: Box
    ) -> None:
        """Write one tile's probabilities and full-resolution mask into its own chunks.

        Invariant 1 is checked, not assumed: ``tile.region`` must be prob chunk ``tile.index``
        and ``full_box`` the full-res chunks the tile owns (it may be empty). Rewriting
        the same tile writes the same bytes.
        """
        work, full = self.owned_boxes(tile)
        where = f"{self.path}: tile {tile.index}"
        if tile.region != work:
            raise StoreError(f"{where}: region {tile.region} is not its prob chunk {work}")
        if full_box != full:
            raise StoreError(f"{where}: full_box {full_box} is not its own mask chunks {full}")
        prob = self._encode_prob(prob_work, work, where)
        mask = self._check_mask(mask_full, full, where)
        self.prob[work.y0 : work.y1, work.x0 : work.x1, :] = prob
        if not full.is_empty:
            self.mask[full.y0 : full.y1, full.x0 : full.x1] = mask

    def _encode_prob(self, prob: np.ndarray, box: Box, where: str) -> np.ndarray:
        expected = (*box.shape, len(self.layout.classes))
        if prob.shape != expected:
            raise StoreError(f"{where}: prob shape {prob.shape}, expected {expected}")
        if not np.isfinite(prob).all():
            raise StoreError(f"{where}: prob holds NaN or inf")
        if self.layout.prob_dtype == "uint8":
            return np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
        return prob.astype(self.layout.prob_dtype)

    def _check_mask(self, mask: np.ndarray, box: Box, where: str) -> np.ndarray:
        if box.is_empty:
            return mask
        if mask.shape != box.shape or mask.dtype != np.uint8:
            raise StoreError(
                f"{where}: mask {mask.shape} {mask.dtype}, expected {box.shape} uint8"
            )
        n = len(self.layout.classes)
        if mask.size and int(mask.max()) > n:
            raise StoreError(f"{where}: mask label {int(mask.max())} > {n} classes")
        return mask

    def read_prob(self, box: Box | None = None) -> np.ndarray:
        """Probabilities of a working-level box as float32 in [0, 1], (h, w, C)."""
        b = box or Box(0, 0, *self.layout.work_hw)
        raw = self.prob[b.y0 : b.y1, b.x0 : b.x1, :]
        if self.layout.prob_dtype == "uint8":
            return raw.astype(np.float32) / np.float32(255.0)
        return raw.astype(np.float32)

    def write_thumbnail(self, image: np.ndarray) -> None:
        """Store a small picture of the input as the group's NGFF image pyramid. Driver only.

        ``image`` is the whole input downsampled to a long side <= THUMBNAIL_MAX_SIDE,
        (h, w) or (h, w, 3|4). RGB becomes grey because NGFF wants a label image to
        have its parent image's axes, and the mask is (y, x).
        """
        grey = _to_grey(image, self.path)
        if max(grey.shape) > THUMBNAIL_MAX_SIDE:
            raise StoreError(f"{self.path}: thumbnail {grey.shape} > {THUMBNAIL_MAX_SIDE}")
        levels = [grey]
        while max(levels[-1].shape) > THUMBNAIL_MIN_SIDE:
            levels.append(_reduce2(levels[-1]))
        for k, level in enumerate(levels):
            arr = self._group.create_array(
                str(k), shape=level.shape, dtype=level.dtype, chunks=(512, 512),
                compressors=_COMPRESSORS, dimension_names=("y", "x"), overwrite=True,
            )  # fmt: skip
            arr[...] = level
        stale = [n for n in self._group.array_keys() if n.isdigit() and int(n) >= len(levels)]
        for name in stale:
            del self._group[name]
        full_h, full_w = self.layout.full_hw
        scales = [(full_h / lv.shape[0], full_w / lv.shape[1]) for lv in levels]
        multiscales = ngff_multiscales(self.image_id, self.layout.mpp, scales)
        self._group.attrs.update({"ome": {"version": NGFF_VERSION, "multiscales": multiscales}})

    def write_preview(self, image: np.ndarray) -> None:
        """Keep the input's colour thumbnail (h, w, C) uint8 for tissue detection and
        overlays; write_thumbnail's NGFF copy is grey."""
        arr = self._group.create_array(
            "preview", shape=image.shape, dtype=np.uint8, chunks=image.shape,
            compressors=_COMPRESSORS, overwrite=True,
        )  # fmt: skip
        arr[...] = image

    def preview(self) -> np.ndarray:
        """The colour thumbnail written at ingest."""
        if "preview" not in self._group:
            raise StoreError(f"{self.path}: no preview; the image was not ingested")
        return np.asarray(self._group["preview"][...])

    # -- tile status (driver only) --------------------------------------------------------

    def status_grid(self) -> np.ndarray:
        """The tile grid of TileStatus values (uint8)."""
        return np.asarray(self._status[...])

    def failures(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Failed tiles: index -> {"error", "attempts"}."""
        raw = self._status.attrs.get("failures", {})
        return {_parse_key(k): dict(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def set_status(
        self,
        index: tuple[int, int],
        status: TileStatus,
        *,
        error: str | None = None,
        attempts: int | None = None,
        seconds: float | None = None,
    ) -> None:
        """Record one tile; see ``set_many``."""
        self.set_many([TileReport(index, status, error, attempts, seconds)])

    def set_many(self, reports: Iterable[TileReport]) -> None:
        """Record many tiles in one write per object. The driver is the only writer.

        A FAILED report needs its error; any other status clears the tile's failure.
        The grid is written last, so a tile reads DONE/FAILED only once its details are.
        """
        grid, seconds = self.status_grid(), None
        before = self._status.attrs.get("failures", {})
        failures = dict(before)  # type: ignore[call-overload]
        for rep in reports:
            r, c = self._check_index(rep.index)
            status, key = TileStatus(rep.status), f"{r},{c}"
            if status is TileStatus.FAILED:
                if not rep.error:
                    raise StoreError(f"{self.path}: tile {rep.index} FAILED without an error")
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
        grid = self.status_grid()
        todo = (TileStatus.PENDING, TileStatus.FAILED)
        return [t for t in all_tiles if grid[self._check_index(t.index)] in todo]

    def counts(self) -> dict[str, int]:
        """Tiles per status, by lower-case name, plus "total"."""
        n = np.bincount(self.status_grid().ravel(), minlength=len(TileStatus))
        return {s.name.lower(): int(n[s]) for s in TileStatus} | {"total": int(n.sum())}

    def mark_state(self, state: State) -> None:
        """Set the completion state; "complete" only when every tile is done or skipped."""
        if state not in STATES:
            raise StoreError(f"{self.path}: unknown state {state!r}, expected one of {STATES}")
        if state == "complete" and not is_complete(self.status_grid()):
            raise StoreError(f"{self.path}: cannot mark complete, tiles left: {self.counts()}")
        self._update_meta(state=state)

    def finalize(self) -> State:
        """Build the mask pyramid, then write the state, last: "complete" when every tile
        is done or skipped, else "partial" (failed or never-run tiles remain)."""
        self.build_pyramid()
        state: State = "complete" if is_complete(self.status_grid()) else "partial"
        self.mark_state(state)
        return state

    def build_pyramid(self) -> None:
        """Fill levels 1.. by taking every 2nd pixel of the level above (nearest, never an
        average: labels stay labels), chunk by chunk with dask."""
        for k in range(1, len(self.layout.levels)):
            src, dst = self.mask_level(k - 1), self.mask_level(k)
            down = da.from_zarr(src)[::2, ::2].rechunk(dst.chunks)
            da.store(down, dst, lock=False)

    def summary(self) -> dict[str, Any]:
        """A small JSON-able report: shapes, state, counts, failed tiles, mask fractions."""
        failed = sorted(self.failures().items())
        lay = self.layout
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
            "mask_fraction": self._mask_fraction(),
        }

    def _mask_fraction(self) -> dict[str, float] | None:
        """Per-class area fraction from the coarsest pyramid level (None before finalize)."""
        if self.state not in ("partial", "complete"):
            return None
        labels = np.asarray(self.mask_level(len(self.layout.levels) - 1)[...])
        counts = np.bincount(labels.ravel(), minlength=len(self.layout.classes) + 1)
        return {
            name: round(float(counts[i]) / labels.size, 6)
            for i, name in enumerate(self.layout.classes, start=1)
        }

    def _check_index(self, index: tuple[int, int]) -> tuple[int, int]:
        r, c = (int(i) for i in index)
        rows, cols = self.layout.grid
        if not (0 <= r < rows and 0 <= c < cols):
            raise StoreError(f"{self.path}: tile {index} outside the {rows}x{cols} grid")
        return r, c


# ---------------------------------------------------------------------------------------
# Helpers


def _location(path: str | Path) -> str:
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser())


def _open_group(where: str, mode: Literal["r", "r+"]) -> zarr.Group | None:
    """The zarr group at ``where``, or None when nothing is there."""
    try:
        return zarr.open_group(where, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except zarr.errors.ContainsArrayError as exc:
        raise StoreError(f"{where}: holds a zarr array, not an output store") from exc


def _create_layout(group: zarr.Group, layout: StoreLayout, record: Mapping[str, Any]) -> None:
    """Create every array and the NGFF metadata; the segpipe attributes go last."""
    ome = {"version": NGFF_VERSION}
    labels = group.create_group("labels", attributes={"ome": {**ome, "labels": ["mask"]}})
    scales = [(2.0**k, 2.0**k) for k in range(len(layout.levels))]
    mask_attrs = {
        **ome,
        "multiscales": ngff_multiscales("mask", layout.mpp, scales),
        "image-label": ngff_image_label(layout.classes),
    }
    mask_group = labels.create_group("mask", attributes={"ome": mask_attrs})
    for k, shape in enumerate(layout.levels):
        chunks = (layout.full_chunk,) * 2 if k == 0 else _level_chunks(layout.full_chunk, shape)
        mask_group.create_array(
            str(k), shape=shape, dtype="uint8", chunks=chunks, fill_value=0,
            compressors=_COMPRESSORS, dimension_names=("y", "x"),
        )  # fmt: skip
    n = len(layout.classes)
    encoding = _prob_encoding(layout.prob_dtype)
    group.create_array(
        "prob", shape=(*layout.work_hw, n), dtype=layout.prob_dtype,
        chunks=(layout.tile, layout.tile, n), fill_value=0, compressors=_COMPRESSORS,
        dimension_names=("y", "x", "c"),
        attributes={"channels": list(layout.classes), "encoding": encoding},
    )  # fmt: skip
    for name, dtype, fill in (("status", "uint8", 0), ("tile_seconds", "float32", float("nan"))):
        group.create_array(
            name, shape=layout.grid, dtype=dtype, chunks=layout.grid, fill_value=fill,
            compressors=_COMPRESSORS, dimension_names=("row", "col"),
        )  # fmt: skip
    meta = {"format": FORMAT, "state": "pending", "layout": layout.to_dict(), "provenance": record}
    group.attrs.update({"segpipe": meta})


def _prob_encoding(prob_dtype: str) -> str:
    if prob_dtype == "uint8":
        return "uint8 = round(p * 255); p = value / 255"
    return f"{prob_dtype} = p"


def _to_grey(image: np.ndarray, where: str) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] in (3, 4):
        # ITU-R 709 luma, as skimage.color.rgb2gray, kept in the input's dtype.
        grey = image[..., :3].astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32)
        return _cast_like(grey, image.dtype)
    raise StoreError(f"{where}: thumbnail must be (h, w) or (h, w, 1|3|4), got {image.shape}")


def _reduce2(level: np.ndarray) -> np.ndarray:
    """Half size with a gaussian pre-filter: a picture, unlike labels, is averaged."""
    reduced = pyramid_reduce(level, downscale=2, preserve_range=True, channel_axis=None)
    return _cast_like(reduced, level.dtype)


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _parse_key(key: str) -> tuple[int, int]:
    r, c = key.split(",")
    return int(r), int(c)
