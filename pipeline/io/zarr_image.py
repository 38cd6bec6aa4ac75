"""zarr inputs: a plain 2D/3D array, or an OME-Zarr (NGFF 0.4/0.5) multiscales group.

A plain array is (H, W), (H, W, C) when the last axis has 1, 3 or 4 entries, else (C, H, W)
when the first one does. An NGFF group names its axes: 't' and 'z' must be singletons, 'c'
is the channel axis; mpp comes from the y/x scale of each dataset's coordinateTransformations
when the axis unit is micrometer. Reads are lazy: zarr decodes only the chunks touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.errors import InputError
from pipeline.io.image import (
    ALLOWED_CHANNELS,
    Image,
    Kind,
    Limits,
    Shape,
    check_chunk_size,
    one_line,
)

_UM_PER_UNIT = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


class ZarrImage(Image):
    """A zarr array or NGFF multiscales group, each level viewed as (H, W, C)."""

    kind: Kind = "slide"

    def __init__(self, path: Path, limits: Limits) -> None:
        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:  # zarr raises on missing or corrupt metadata documents
            raise InputError(f"{path}: unreadable zarr: {one_line(exc)}") from exc
        if isinstance(node, zarr.Array):
            self._arrays = [node]
            self._order = _plain_order(path, node.shape)
            mpp = None
            self._format = "zarr"
        else:
            self._arrays, self._order, mpp = _multiscales(path, node)
            self._format = "ome-zarr"
        levels = [_shape(array.shape, self._order) for array in self._arrays]
        super().__init__(path, levels, mpp, self._arrays[0].dtype, limits)
        for array in self._arrays:
            check_chunk_size(path, _shape(array.chunks, self._order)[:2], limits)

    @property
    def format_name(self) -> str:
        return self._format

    def lazy_level(self, level: int) -> da.Array:
        drop = tuple(0 if axis == "1" else slice(None) for axis in self._order)
        return _to_hwc(da.from_zarr(self._arrays[level])[drop], self._order)

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        array = self._arrays[level]
        index = tuple(_region_index(axis, y, x, h, w) for axis in self._order)
        return np.asarray(_to_hwc(array[index], self._order))


# An axis order names each stored axis: 'y', 'x', 'c', or '1' for a singleton to drop.
Order = tuple[str, ...]


def _plain_order(path: Path, shape: tuple[int, ...]) -> Order:
    if len(shape) == 2:
        return ("y", "x")
    if len(shape) == 3 and shape[2] in ALLOWED_CHANNELS:
        return ("y", "x", "c")
    if len(shape) == 3 and shape[0] in ALLOWED_CHANNELS:
        return ("c", "y", "x")
    raise InputError(
        f"{path}: zarr array of shape {shape}; expected (H, W), (H, W, C) or (C, H, W) "
        f"with C in {ALLOWED_CHANNELS}"
    )


def _multiscales(path: Path, group: zarr.Group) -> tuple[list[zarr.Array], Order, float | None]:
    attrs = group.attrs.asdict()
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")  # 0.4 / 0.5
    if not multiscales:
        raise InputError(f"{path}: zarr group without NGFF 'multiscales' metadata")
    spec = multiscales[0]
    axes = [axis["name"] if isinstance(axis, dict) else axis for axis in spec["axes"]]
    try:
        arrays = [group[dataset["path"]] for dataset in spec["datasets"]]
    except KeyError as exc:
        raise InputError(f"{path}: NGFF dataset {exc} missing") from exc
    order = tuple(
        _ngff_axis(path, name, size) for name, size in zip(axes, arrays[0].shape, strict=True)
    )
    if sorted(a for a in order if a != "1") not in (["x", "y"], ["c", "x", "y"]):
        raise InputError(f"{path}: NGFF axes {axes} {arrays[0].shape}; expected a 2D image")
    return arrays, order, _ngff_mpp(spec, axes)


def _ngff_axis(path: Path, name: str, size: int) -> str:
    if name in ("y", "x", "c"):
        return name
    if size == 1:
        return "1"
    raise InputError(f"{path}: NGFF axis {name!r} has {size} entries; only 2D images are read")


def _ngff_mpp(spec: dict[str, Any], axes: list[str]) -> float | None:
    """µm per pixel along x of dataset 0, when the x axis has a length unit."""
    x = axes.index("x")
    axis = spec["axes"][x]
    unit = axis.get("unit") if isinstance(axis, dict) else None
    if unit not in _UM_PER_UNIT:
        return None
    for transform in spec["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = float(transform["scale"][x]) * _UM_PER_UNIT[unit]
            return scale if scale > 0 else None
    return None


def _shape(shape: tuple[int, ...], order: Order) -> Shape:
    sizes = dict(zip(order, shape, strict=True))
    return (sizes["y"], sizes["x"], sizes.get("c", 1))


def _region_index(axis: str, y: int, x: int, h: int, w: int) -> slice | int:
    return {"y": slice(y, y + h), "x": slice(x, x + w), "c": slice(None), "1": 0}[axis]


def _to_hwc(array: Any, order: Order) -> Any:
    """Move a region indexed by _region_index (singletons gone) to (h, w, C)."""
    kept = [axis for axis in order if axis != "1"]
    if "c" not in kept:
        return array[..., None]
    return array.transpose([kept.index("y"), kept.index("x"), kept.index("c")])
