"""TIFF family: plain TIFF X-rays, Aperio SVS, pyramidal (Big)TIFF and OME-TIFF.

Every level is read lazily through tifffile's zarr store (``series.aszarr(level=i)``), so a
region read decodes only the tiles (or strips) it touches, each once while it stays in the
image's bounded cache of decoded tiles (tile_cache.py); imagecodecs supplies the codecs
(JPEG, JPEG 2000 incl. Aperio 33003/33005, LZW, deflate, zstd, ...). The level list is the
first series' pyramid: for SVS that is the Baseline series, so label, macro and thumbnail
pages (separate series) are skipped.

A TIFF is a "slide" when it is SVS or OME, has more than one level, or is tiled; otherwise
it is a plain "xray" (stripped, one level) and its whole size must fit max_pixels.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import tifffile
import zarr

from pipeline.errors import InputError
from pipeline.io.image import Image, Kind, Limits, Shape, check_chunk_size, one_line
from pipeline.io.tile_cache import DEFAULT_CACHE_BYTES, CachedStore, TileCache

log = logging.getLogger(__name__)

_UM_PER_UNIT = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
_UM_PER_RESOLUTION_UNIT = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25400.0}
# Pillow, Photoshop and most scanners' drivers write 72 dpi when they know nothing;
# reading it as 353 µm/pixel would silently rescale an X-ray. Limit: a real 72-dpi image
# loses its pixel size.
_PLACEHOLDER_DPI = 72.0


# tifffile's flag of each TIFF flavour read here, and the name metadata records for it.
_VENDOR_FORMATS = (("is_svs", "svs"), ("is_ndpi", "ndpi"), ("is_philips", "philips-tiff"),
                   ("is_ome", "ome-tiff"))  # fmt: skip


class TiffImage(Image):
    """The first series of a TIFF file, level by level, read through tifffile's zarr store."""

    def __init__(self, path: Path, limits: Limits, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._tif = _open(path)
        try:
            series = self._tif.series[0]
            self._axes = series.axes
            self.tile_cache = TileCache(cache_bytes)
            self._stores = [
                zarr.open_array(CachedStore(series.aszarr(level=i), self.tile_cache, i), mode="r")
                for i in range(len(series.levels))
            ]
            levels = [_level_shape(path, self._axes, store.shape) for store in self._stores]
            page = series.levels[0].keyframe
            self.kind: Kind = _kind(self._tif, page, len(levels))
            super().__init__(path, levels, _mpp(self._tif, page), series.dtype, limits)
            for store in self._stores:
                check_chunk_size(path, _yx_chunk(self._axes, store.chunks), limits)
        except InputError:
            self._tif.close()
            raise
        except Exception as exc:  # tifffile raises on malformed IFDs, tags or series
            self._tif.close()
            raise InputError(f"{path}: unreadable TIFF structure: {one_line(exc)}") from exc

    @property
    def format_name(self) -> str:
        for flag, name in _VENDOR_FORMATS:
            if getattr(self._tif, flag):
                return name
        return "tiff"

    def metadata_safe(self) -> dict[str, Any]:
        meta = super().metadata_safe()
        page = self._tif.pages.first
        meta.update(compression=page.compression.name, tile=[page.tilelength, page.tilewidth])
        return meta

    def lazy_level(self, level: int) -> da.Array | None:
        if not self._tif.pages.first.is_tiled:
            return None  # strips span the full width: ingest them instead
        return _channels_last(da.from_zarr(self._stores[level]), self._axes)

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        store = self._stores[level]
        if self._axes == "CYX":
            return np.moveaxis(store[:, y : y + h, x : x + w], 0, -1)
        region = store[y : y + h, x : x + w]
        return region[..., None] if self._axes == "YX" else region

    def close(self) -> None:
        self._tif.close()


def _open(path: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # TiffFileError, struct.error, OSError on truncated headers
        raise InputError(f"{path}: unreadable TIFF: {one_line(exc)}") from exc


def _kind(tif: tifffile.TiffFile, page: tifffile.TiffPage, n_levels: int) -> Kind:
    """'slide' for SVS, OME, pyramids and tiled files (read lazily), else a plain 'xray'."""
    if tif.is_svs or tif.is_ome or n_levels > 1 or page.is_tiled:
        return "slide"
    return "xray"


def _level_shape(path: Path, axes: str, shape: tuple[int, ...]) -> Shape:
    """(H, W, C) of a level stored with ``axes``: YX, YXS (samples last) or CYX (OME planar)."""
    if axes == "YX":
        return (shape[0], shape[1], 1)
    if axes == "YXS":
        return (shape[0], shape[1], shape[2])
    if axes == "CYX":
        return (shape[1], shape[2], shape[0])
    raise InputError(
        f"{path}: TIFF series axes {axes!r} {shape}; expected YX, YXS or CYX (2D image)"
    )


def _yx_chunk(axes: str, chunks: tuple[int, ...]) -> tuple[int, int]:
    return (chunks[1], chunks[2]) if axes == "CYX" else (chunks[0], chunks[1])


def _channels_last(array: da.Array, axes: str) -> da.Array:
    if axes == "CYX":
        return da.moveaxis(array, 0, -1)
    return array[..., None] if axes == "YX" else array


def _mpp(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> float | None:
    """µm per pixel of level 0: Aperio 'MPP = ...', OME PhysicalSizeX, else resolution tags."""
    if tif.is_svs:
        return _aperio_mpp(tif.filename, page.description)
    if tif.is_philips and tif.philips_metadata:
        return _philips_mpp(tif.filename, tif.philips_metadata)
    if tif.is_ome and tif.ome_metadata:
        mpp = _ome_mpp(tif.filename, tif.ome_metadata)
        if mpp is not None:
            return mpp
    return _resolution_mpp(page)


def _aperio_mpp(name: str, description: str) -> float | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if match is None:
        return None
    mpp = float(match.group(1))
    if mpp <= 0:
        log.warning("%s: ignoring Aperio MPP = %s", name, mpp)
        return None
    return mpp


def _philips_mpp(name: str, xml: str) -> float | None:
    """Level 0's column spacing: the first PixelDataRepresentation's DICOM_PIXEL_SPACING,
    '"row" "column"' in mm (Philips TIFF writes the DICOM attribute as quoted text)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        log.warning("%s: unparsable Philips XML, no pixel size: %s", name, exc)
        return None
    spacing = root.find(".//DataObject[@ObjectType='PixelDataRepresentation']"
                        "/Attribute[@Name='DICOM_PIXEL_SPACING']")  # fmt: skip
    values = (spacing.text or "").replace('"', " ").split() if spacing is not None else []
    if len(values) != 2 or float(values[1]) <= 0:
        return None
    return float(values[1]) * 1000.0


def _ome_mpp(name: str, xml: str) -> float | None:
    try:
        pixels = ET.fromstring(xml).find(".//{*}Image/{*}Pixels")
    except ET.ParseError as exc:
        log.warning("%s: unparsable OME-XML, no pixel size: %s", name, exc)
        return None
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")  # OME's default unit
    if unit not in _UM_PER_UNIT:
        log.warning("%s: unknown OME PhysicalSizeXUnit %r, no pixel size", name, unit)
        return None
    size = float(pixels.attrib["PhysicalSizeX"]) * _UM_PER_UNIT[unit]
    return size if size > 0 else None


def _resolution_mpp(page: tifffile.TiffPage) -> float | None:
    if "XResolution" not in page.tags:
        return None
    unit = page.resolutionunit
    pixels_per_unit = page.resolution[0]
    if unit not in _UM_PER_RESOLUTION_UNIT or pixels_per_unit <= 0:
        return None
    if unit == tifffile.RESUNIT.INCH and pixels_per_unit == _PLACEHOLDER_DPI:
        return None
    return _UM_PER_RESOLUTION_UNIT[unit] / pixels_per_unit
