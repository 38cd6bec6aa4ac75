"""The on-disk layout of one image's output store, and the code that creates it.

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
    preview            the input's colour thumbnail (h, w, C) uint8, once ingest wrote it
    checksums/         written by finalize: one int64 array per checked array (``prob``,
                       ``labels.mask.0``, ``labels.mask.1``, ...), a row per chunk in chunk
                       order: digest of its stored bytes, size (-1 absent), modification
                       marker (checksums.py); what verify.py checks a finished store against

No array is sharded: a zarr 3 shard written by two processes loses pixels.

``StoreLayout`` holds the shapes and settings the layout is made from (fixed at creation);
``create_layout`` creates every array and the metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, get_args

import zarr
from zarr.codecs import ZstdCodec

from pipeline.config import ProbDtype
from pipeline.engine.tiling import grid_shape
from pipeline.store.errors import StoreError
from pipeline.store.ngff import NGFF_VERSION, ngff_image_label, ngff_multiscales
from pipeline.store.provenance import as_json

FORMAT = 1
PYRAMID_MAX_SIDE = 1024  # the mask pyramid stops at the first level this small
PROB_DTYPES: tuple[str, ...] = get_args(ProbDtype)

# A fixed codec, not zarr's configurable default: a rewritten tile gives identical bytes.
COMPRESSORS = (ZstdCodec(level=3),)


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
        return {**as_json(asdict(self), self.image_id), "scale": list(self.scale)}

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


def create_layout(group: zarr.Group, layout: StoreLayout, record: Mapping[str, Any]) -> None:
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
            compressors=COMPRESSORS, dimension_names=("y", "x"),
        )  # fmt: skip
    n = len(layout.classes)
    encoding = _prob_encoding(layout.prob_dtype)
    group.create_array(
        "prob", shape=(*layout.work_hw, n), dtype=layout.prob_dtype,
        chunks=(layout.tile, layout.tile, n), fill_value=0, compressors=COMPRESSORS,
        dimension_names=("y", "x", "c"),
        attributes={"channels": list(layout.classes), "encoding": encoding},
    )  # fmt: skip
    for name, dtype, fill in (("status", "uint8", 0), ("tile_seconds", "float32", float("nan"))):
        group.create_array(
            name, shape=layout.grid, dtype=dtype, chunks=layout.grid, fill_value=fill,
            compressors=COMPRESSORS, dimension_names=("row", "col"),
        )  # fmt: skip
    meta = {"format": FORMAT, "state": "pending", "layout": layout.to_dict(), "provenance": record}
    group.attrs.update({"segpipe": meta})


def _level_chunks(full_chunk: int, shape: tuple[int, int]) -> tuple[int, int]:
    side = min(full_chunk, PYRAMID_MAX_SIDE)
    return (min(side, shape[0]), min(side, shape[1]))


def _prob_encoding(prob_dtype: str) -> str:
    if prob_dtype == "uint8":
        return "uint8 = round(p * 255); p = value / 255"
    return f"{prob_dtype} = p"
