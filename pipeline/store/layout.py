"""The on-disk layout of one image's output store, and the code that creates it.

Layout of ``OUT/<image-id>.zarr`` (OME-NGFF 0.5, the NGFF version defined on zarr v3: 0.4's
multiscales / labels metadata under an ``ome`` attribute), format 2:

    zarr.json          ``ome``: the picture's multiscales and omero rendering (written by
                       ingest, last); ``segpipe``: format, layout, provenance, ``state``
    k0, k0+1, ...      the picture: the input in its own colours, uint8 (c, y, x), c = 3
                       (RGB; alpha dropped) or 1 (grey, windowed for display); array k has
                       the shape of mask level k (picture.py)
    labels/            ``ome.labels == ["mask"]``
    labels/mask/0      uint8 label image at the input's full resolution, 0 = background,
                       1..C = classes; square chunks of ``full_chunk`` (at most 2048, see
                       tiling.full_res_chunk; no larger than the image: clamped); the chunks tile (r, c) owns are
                       ``tiling.full_res_owned`` (invariant 1: a tile may own several
                       chunks, a chunk has one owner)
    labels/mask/1...   x2 nearest-neighbour downsamples (level k = level 0[::2^k, ::2^k],
                       scale 2^k) until the long side <= 1024; all stored, NGFF lists k0..
    labels/nuclei/0..  with a model that declares instances (card ``instances``, named
                       there): uint32 instance ids 1..n unique per image, 0 = none, at the
                       mask's levels and chunks; written by finalize from instances/
    instances/nuclei   uint32 instance keys at the working level, chunk (r, c) tile (r, c)'s
                       (pipeline.instances: an anchor pixel per instance, the same from
                       every tile that sees it); finalize maps them to compact ids
    prob/              an NGFF image of its own: probabilities at the working level as
                       channels (c, y, x) with ``omero`` heat-map colours, so viewers show
                       them (``napari OUT/<id>.zarr/prob``)
    prob/0             (C, h, w), chunks (C, tile, tile) (clamped to (h, w)): chunk (0, r, c)
                       is tile (r, c)'s.
                       uint8 holds round(p * 255); one channel per foreground class (one
                       class: the foreground probability). float16 / float32 store p itself
    prob/1...          x2 means (finalize) until the long side <= 1024
    status             uint8 tile grid of TileStatus; its ``failures`` attribute holds each
                       failed tile's error and attempt count
    tile_seconds       float32 tile grid: seconds each tile took (NaN: not recorded)
    preview            the input's colour thumbnail (h, w, C) uint8, once ingest wrote it
    checksums/         written by finalize: one int64 array per checked array (``prob.0``,
                       ``prob.1``, ``labels.mask.0``, ...), a row per chunk in chunk order:
                       digest of its stored bytes, size (-1 absent), modification marker
                       (checksums.py); what verify.py checks a finished store against

The picture and the labels share their levels, as NGFF wants (a label image has as many
levels as its image, "usually" with the same shapes and transforms): level k of both has
the same shape, path and scale 2^k (times µm/px when known), so they overlay in any
viewer. The picture starts at level k0, the first level whose long side is at most
PICTURE_MAX_SIDE (8192): level 0 (the full input) for every X-ray in practice and for
small slides; a large slide's picture is bounded (a 100k² slide copied whole would be
30 GB of RGB). The mask's NGFF multiscales then lists levels k0.. too, the ones the picture
has: NGFF has no image level without pixels, and a label image with more levels than its
image is invalid. Levels 0..k0-1 of the mask are still stored (level 0 is the output);
exports (OME-TIFF, PNG, DICOM SEG) and ``OutputStore.mask`` read them, and a viewer shows
the mask at the picture's finest resolution. Why not other layouts: a picture of the whole
slide at full resolution costs a second copy of the slide; a picture with empty fine
levels shows blank glass when zoomed in; a label pyramid copied at the picture's scales
doubles what finalize writes and verifies for no pixel a viewer would not already show.

The label's axes are (y, x) where the picture's are (c, y, x): NGFF says a label's
dimension SHOULD equal its image's or be 1 where irrelevant; viewers split the picture's
channels into (y, x) layers and overlay the mask on each. Labels open hidden in napari
and ome-zarr-py whatever the metadata says: NGFF has no visibility field for labels, and
both readers hide label layers by default (tick the layer).

No array is sharded: a zarr 3 shard written by two processes loses pixels.

Format 1 (``prob`` an (h, w, C) array, a grey thumbnail at the root, colours without a
background property: invalid for the NGFF validator) is
still opened for reading (status, verify, exports); a run re-runs such an output in
format 2 (OutputStore.create_or_open).

``StoreLayout`` holds the shapes and settings the layout is made from (fixed at creation);
``create_layout`` creates every array and the metadata but the picture's.
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
from pipeline.store.ngff import (
    NGFF_VERSION,
    class_channels,
    ngff_image_label,
    ngff_instance_label,
    ngff_multiscales,
    ngff_omero,
)
from pipeline.store.provenance import as_json

FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1: prob (h, w, C) at "prob"; opened read-only
PYRAMID_MAX_SIDE = 1024  # the mask and prob pyramids stop at the first level this small
PICTURE_MAX_SIDE = 8192  # the picture's finest level: the first mask level this small
PYRAMID_CHUNK = 1024  # chunk side of pyramid levels 1.. (and of the picture)
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
    # instance label images beside the mask (the card's instances, pipeline.instances): ()
    # or one name, e.g. ("nuclei",)
    instances: tuple[str, ...] = ()

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
        if len(self.instances) > 1 or not all(n.isidentifier() and n != "mask" for n in self.instances):
            raise StoreError(f"{where}: instances must be () or one name other than mask, {self.instances=}")

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.work_hw, self.tile)

    @property
    def levels(self) -> list[tuple[int, int]]:
        """Shapes of the mask pyramid, full resolution first."""
        return pyramid_shapes(self.full_hw)

    @property
    def picture_from(self) -> int:
        """The first level the picture (and the mask's NGFF multiscales) has."""
        return picture_from(self.levels)

    @property
    def shown_levels(self) -> range:
        """The levels NGFF lists, for the picture and the mask alike."""
        return range(self.picture_from, len(self.levels))

    @property
    def prob_levels(self) -> list[tuple[int, int]]:
        """Shapes of the probability pyramid, the working level first."""
        return pyramid_shapes(self.work_hw)

    @property
    def scale(self) -> tuple[float, float]:
        """Full-resolution pixels per working-level pixel, per axis."""
        return (self.full_hw[0] / self.work_hw[0], self.full_hw[1] / self.work_hw[1])

    def to_dict(self) -> dict[str, Any]:
        d = {**as_json(asdict(self), self.image_id), "scale": list(self.scale),
             "picture_from": self.picture_from}  # fmt: skip
        if not self.instances:  # a store without instances reads as before they existed
            del d["instances"]
        return d

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
            instances=tuple(d.get("instances", ())),
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


def picture_from(levels: list[tuple[int, int]]) -> int:
    """The picture's first level among the mask's ``levels``: the first whose long side is
    at most PICTURE_MAX_SIDE."""
    return next(k for k, hw in enumerate(levels) if max(hw) <= PICTURE_MAX_SIDE)


def level_scales(levels: range) -> list[tuple[float, float]]:
    """Full-resolution pixels per pixel of mask (and picture) level k: 2^k exactly (mask
    level k is level 0[::2^k, ::2^k])."""
    return [(2.0**k, 2.0**k) for k in levels]


def prob_transforms(layout: StoreLayout) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Scales and translations (full-resolution pixels) of the probability levels.

    A working-level pixel i is full-resolution (i + 0.5) * s - 0.5 (the align_corners=False
    mapping the mask is delivered with), and a mean of 2^k of them sits at their centre:
    level k has scale S = s * 2^k and its first pixel's centre at (S - 1) / 2."""
    sy, sx = layout.scale
    scales = [(sy * 2**k, sx * 2**k) for k in range(len(layout.prob_levels))]
    return scales, [((y - 1) / 2, (x - 1) / 2) for y, x in scales]


def create_layout(group: zarr.Group, layout: StoreLayout, record: Mapping[str, Any]) -> None:
    """Create every array and the NGFF metadata (the picture's comes with its pixels,
    picture.py); the segpipe attributes go last."""
    ome = {"version": NGFF_VERSION}
    labels = group.create_group("labels", attributes={"ome": {**ome, "labels": ["mask", *layout.instances]}})
    _create_label(labels, "mask", ngff_image_label(layout.classes), "uint8", layout)
    for name in layout.instances:
        _create_label(labels, name, ngff_instance_label(), "uint32", layout)
        _create_instance_keys(group, name, layout)
    _create_prob(group, layout)
    for name, dtype, fill in (("status", "uint8", 0), ("tile_seconds", "float32", float("nan"))):
        group.create_array(
            name, shape=layout.grid, dtype=dtype, chunks=layout.grid, fill_value=fill,
            compressors=COMPRESSORS, dimension_names=("row", "col"),
        )  # fmt: skip
    meta = {"format": FORMAT, "state": "pending", "layout": layout.to_dict(), "provenance": record}
    group.attrs.update({"segpipe": meta})


def _create_label(labels: zarr.Group, name: str, image_label: dict[str, Any], dtype: str,
                  layout: StoreLayout) -> None:
    """A label image at the mask's levels (NGFF lists the picture's, all are stored)."""
    shown = layout.shown_levels
    attrs = {
        "version": NGFF_VERSION,
        "multiscales": ngff_multiscales(name, layout.mpp, level_scales(shown),
                                        paths=[str(k) for k in shown]),
        "image-label": image_label,
    }  # fmt: skip
    label = labels.create_group(name, attributes={"ome": attrs})
    for k, shape in enumerate(layout.levels):
        chunks = clamped((layout.full_chunk,) * 2, shape) if k == 0 else level_chunks(shape, layout.full_chunk)
        label.create_array(
            str(k), shape=shape, dtype=dtype, chunks=chunks, fill_value=0,
            compressors=COMPRESSORS, dimension_names=("y", "x"),
        )  # fmt: skip


def _create_instance_keys(group: zarr.Group, name: str, layout: StoreLayout) -> None:
    """The tiles' instance keys at the working level (pipeline.instances): chunk (r, c) is
    tile (r, c)'s, as in prob/0; finalize maps them to the ids of labels/<name>."""
    group.require_group("instances").create_array(
        name, shape=layout.work_hw, dtype="uint32", chunks=clamped((layout.tile,) * 2, layout.work_hw),
        fill_value=0, compressors=COMPRESSORS, dimension_names=("y", "x"),
    )  # fmt: skip


def _create_prob(group: zarr.Group, layout: StoreLayout) -> None:
    """The probability image: its pyramid's arrays, multiscales and heat-map rendering."""
    n = len(layout.classes)
    scales, translations = prob_transforms(layout)
    window = (0.0, 255.0) if layout.prob_dtype == "uint8" else (0.0, 1.0)
    attrs = {
        "version": NGFF_VERSION,
        "multiscales": ngff_multiscales("probabilities", layout.mpp, scales, channel=True,
                                        translations=translations),
        "omero": ngff_omero(class_channels(layout.classes), window),
    }  # fmt: skip
    prob = group.create_group("prob", attributes={"ome": attrs})
    for k, shape in enumerate(layout.prob_levels):
        chunks = (n, *clamped((layout.tile,) * 2, shape)) if k == 0 else (n, *level_chunks(shape))
        prob.create_array(
            str(k), shape=(n, *shape), dtype=layout.prob_dtype, chunks=chunks, fill_value=0,
            compressors=COMPRESSORS, dimension_names=("c", "y", "x"),
            attributes={"channels": list(layout.classes), "encoding": _prob_encoding(layout.prob_dtype)},
        )  # fmt: skip


def clamped(chunks: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """``chunks`` no larger than ``shape``: an array smaller than one chunk is one chunk of
    its own size, the same key and owner as the full-size chunk (the owner tile's boxes come
    from ``full_chunk`` and ``tile``), without encoding the padding beyond the array
    (a 1024² mask in a 2048² chunk: 17 ms a write instead of 3)."""
    return tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))


def level_chunks(shape: tuple[int, int], side: int = PYRAMID_CHUNK) -> tuple[int, int]:
    """Chunks of a pyramid level (1.., and of the picture): at most PYRAMID_CHUNK a side."""
    side = min(side, PYRAMID_CHUNK)
    return (min(side, shape[0]), min(side, shape[1]))


def _prob_encoding(prob_dtype: str) -> str:
    if prob_dtype == "uint8":
        return "uint8 = round(p * 255); p = value / 255"
    return f"{prob_dtype} = p"
