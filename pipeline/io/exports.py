"""Writers from a mask (a zarr array or pyramid of (H, W) uint8 labels, 0 = background,
1..C = classes) to files. Pure: they read their inputs and write one file.

- ``export_ome_tiff``: pyramidal tiled OME-TIFF, fed tile by tile (memory: one tile); its
  levels are SubIFDs, which OME readers want and OpenSlide does not read.
- ``export_slide_tiff`` (slide_tiff.py): the same pyramid as a plain tiled TIFF, levels as
  top-level IFDs, with a colour map and class names: what OpenSlide-based viewers open.
- ``export_geojson`` (geojson.py): each region of the mask as one polygon feature with
  its class, in full-resolution pixels: what QuPath imports as objects.
- ``export_png``: the raw labels 0..C, lossless, so the file reads back as the mask; for
  looking at a mask use ``export_overlay``. PNG encoders need the whole image in memory, so
  this refuses masks over PNG_MAX_PIXELS: export a pyramid level of a slide instead.
- ``export_overlay``: the input with the mask tinted and outlined in class colours, at most
  ``max_size`` on the long side (X-rays and slide thumbnails).
- ``export_dicom_seg`` (``pipeline.io.dicom_seg``): a DICOM Segmentation (highdicom, BINARY)
  referencing the source X-ray's study, series and instance, naming the model; for a DICOM
  WSI, ``export_slide_seg`` (``pipeline.io.dicom_seg_slide``): a tiled SEG on one level.

``EXPORTS`` is the registry: export name -> ``ExportFormat`` (writer, file suffix, which
inputs it applies to). Its writers take an ``ExportInput``: one image's mask pyramid and
what describes it. Colours and windowing come from ``pipeline.display``.

Every writer takes a local path or any fsspec URL (s3://..., memory://...) and writes
through ``pipeline.io.export_files.writing``, so a half-written export never lies under its
name; ``export_location`` is the one rule for where an export lies, ``export_exists`` says
whether it is there (both from ``pipeline.io.export_files``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import tifffile
from skimage.segmentation import find_boundaries

from pipeline.cards import ModelId
from pipeline.display import as_rgb, class_colours, window_uint8
from pipeline.errors import ConfigError
from pipeline.io.dicom_seg import export_dicom_seg
from pipeline.io.dicom_seg_slide import export_slide_seg
from pipeline.io.export_files import EXPORT_TILE, tiles, writing
from pipeline.io.export_files import export_exists as export_exists
from pipeline.io.export_files import export_location as export_location
from pipeline.io.geojson import export_geojson
from pipeline.io.location import is_remote, local_path
from pipeline.io.resample import resize
from pipeline.io.slide_tiff import export_slide_tiff
from pipeline.io.sniff import sniff

PNG_MAX_PIXELS = 1 << 28  # 16k x 16k
OVERLAY_ALPHA = 0.4
QC_KEY = "segpipe-qc"  # the PNG text chunk that marks a QC-flagged image's export
QC_FRAME = (255, 200, 0)  # the overlay of a QC-flagged image is framed in amber


def export_ome_tiff(mask_levels: Sequence[Any], path: str | Path, mpp: float | None,
                    qc_flag: str | None = None) -> str:  # fmt: skip
    """Write a pyramid of (H, W) uint8 masks (level 0 first, each array-like and sliceable,
    e.g. zarr) as a tiled, zlib-compressed OME-TIFF with sub-IFD levels; PhysicalSizeX/Y and
    the resolution tags carry ``mpp`` (µm per pixel of level 0) when known. A QC-flagged
    image's (``qc_flag``: its reasons) OME image is named "mask (QC flag: ...)"."""
    width0 = mask_levels[0].shape[1]
    # tifffile seeks back to patch offsets: it writes a local file, uploaded after
    with writing(path) as local, tifffile.TiffWriter(local, bigtiff=True, ome=True) as tif:
        for index, level in enumerate(mask_levels):
            level_mpp = None if mpp is None else mpp * width0 / level.shape[1]
            options = _level_options(index, len(mask_levels), level_mpp)
            if index == 0 and qc_flag is not None:
                options["metadata"]["Name"] = f"mask (QC flag: {qc_flag})"
            tif.write(tiles(level), shape=level.shape, dtype=np.uint8, **options)
    return str(path)


def _level_options(index: int, n_levels: int, mpp: float | None) -> dict[str, Any]:
    """tifffile.write options of pyramid level ``index`` whose pixels are ``mpp`` µm."""
    options: dict[str, Any] = {
        "tile": (EXPORT_TILE, EXPORT_TILE),
        "compression": "zlib",
        "photometric": "minisblack",
    }
    if mpp is not None:
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    if index > 0:
        options["subfiletype"] = 1  # reduced-resolution image, stored in level 0's SubIFDs
        return options
    options["subifds"] = n_levels - 1
    options["metadata"] = {"axes": "YX", "Name": "mask"}
    if mpp is not None:
        options["metadata"].update(PhysicalSizeX=mpp, PhysicalSizeY=mpp)
    return options


def export_png(mask: Any, path: str | Path, qc_flag: str | None = None) -> str:
    """Write the (H, W) uint8 labels as they are (values 0..C) to a greyscale PNG; a
    QC-flagged image's (``qc_flag``: its reasons) carries them in a text chunk (QC_KEY)."""
    height, width = mask.shape
    if height * width > PNG_MAX_PIXELS:
        raise ConfigError(
            f"{path}: a {height}x{width} PNG exceeds {PNG_MAX_PIXELS} pixels; "
            "export a pyramid level or use the OME-TIFF export"
        )
    with writing(path) as local:
        PIL.Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(local, format="PNG",
                                                                   pnginfo=_qc_text(qc_flag))
    return str(path)


def export_overlay(
    image_rgb_thumbnail: np.ndarray,
    mask_thumbnail: np.ndarray,
    path: str | Path,
    max_size: int = 2048,
    qc_flag: str | None = None,
) -> str:
    """Write the image with the mask tinted and outlined in class colours as an RGB PNG,
    at most ``max_size`` pixels on the long side. The image is (h, w) or (h, w, C) of any
    dtype (windowed to 8 bits by pipeline.display); the mask is (h', w') labels at any size.
    A QC-flagged image's (``qc_flag``: its reasons) is framed in amber, the reasons in a
    text chunk (QC_KEY)."""
    rgb = window_uint8(as_rgb(image_rgb_thumbnail)).astype(np.float32)
    scale = min(1.0, max_size / max(rgb.shape[:2]))
    shape = (max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale)))
    rgb = np.clip(resize(rgb, shape), 0, 255)
    labels = _nearest(np.asarray(mask_thumbnail), shape)
    colours = class_colours(labels).astype(np.float32)
    inside = labels > 0
    rgb[inside] = (1 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * colours[inside]
    # padded with background so that objects touching the image edge are outlined there too
    edges = find_boundaries(np.pad(labels, 1), mode="inner")[1:-1, 1:-1] & inside
    rgb[edges] = colours[edges]
    if qc_flag is not None:
        frame = max(2, round(0.01 * max(shape)))
        rgb[:frame], rgb[-frame:], rgb[:, :frame], rgb[:, -frame:] = (QC_FRAME,) * 4
    with writing(path) as local:
        PIL.Image.fromarray(np.rint(rgb).astype(np.uint8)).save(local, format="PNG", pnginfo=_qc_text(qc_flag))
    return str(path)


def _qc_text(qc_flag: str | None) -> PIL.PngImagePlugin.PngInfo | None:
    """A PNG text chunk saying the image was QC-flagged and why (None: not flagged)."""
    if qc_flag is None:
        return None
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text(QC_KEY, f"flag: {qc_flag}")
    return info


def _nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label image (labels must not be blended)."""
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1)
    return labels[rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :]]


# ---------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ExportInput:
    """What an export reads: one image's mask pyramid and what describes it."""

    mask_levels: Sequence[Any]  # (H, W) uint8 labels, full resolution first, array-like (zarr)
    classes: tuple[str, ...]
    mpp: float | None  # µm per pixel of level 0
    input_path: str  # a local path or an fsspec URL
    kind: str  # "xray" or "slide" (ImageJob.kind)
    preview: Callable[[], np.ndarray]  # the input's colour thumbnail, read only when needed
    model: ModelId  # the model that made the mask, as exports name it
    input_format: str | None = None  # as provenance records it (pipeline.io.sniff's names)
    qc: Mapping[str, Any] | None = None  # the store's QC verdict (pipeline.qc)
    # opens the instance image (labels/<name>/0, uint32 ids) of a model with instances
    instances: Callable[[], Any] | None = None

    @property
    def qc_flag(self) -> str | None:
        """The reasons of a QC-flagged image ('; '-joined), which its exports are marked
        with; None when it passed (or has no verdict)."""
        if not self.qc or self.qc.get("verdict") != "flag":
            return None
        return "; ".join(self.qc.get("reasons") or []) or "flagged"


def _any_input(source: ExportInput) -> bool:
    return True


@dataclass(frozen=True)
class ExportFormat:
    """One export: its writer (to a local path or an fsspec URL), the suffix of the file
    it writes beside the store, and the inputs it applies to (``requires`` says which, for
    the log line of a skipped one)."""

    write: Callable[[ExportInput, str], str]
    suffix: str
    applies: Callable[[ExportInput], bool] = _any_input
    requires: str = "any input"


def _write_overlay(source: ExportInput, path: str) -> str:
    return export_overlay(source.preview(), np.asarray(source.mask_levels[-1]), path, qc_flag=source.qc_flag)


def _write_png(source: ExportInput, path: str) -> str:
    return export_png(source.mask_levels[0], path, qc_flag=source.qc_flag)


def _write_ome_tiff(source: ExportInput, path: str) -> str:
    return export_ome_tiff(source.mask_levels, path, source.mpp, qc_flag=source.qc_flag)


def _write_slide_tiff(source: ExportInput, path: str) -> str:
    return export_slide_tiff(source.mask_levels, source.classes, path, source.mpp)


def _write_geojson(source: ExportInput, path: str) -> str:
    if source.instances is not None:  # one feature per nucleus, touching ones apart
        export_geojson(source.instances(), source.classes, path, source.mpp, instances=True)
    else:
        export_geojson(source.mask_levels[0], source.classes, path, source.mpp)
    return path


def _write_dicom_seg(source: ExportInput, path: str) -> str:
    if source.kind == "slide":  # a tiled SEG on one level of the slide (dicom_seg_slide.py)
        return export_slide_seg(source.input_path, source.mask_levels, list(source.classes), path,
                                source.model, qc_flag=source.qc_flag)  # fmt: skip
    mask = np.asarray(source.mask_levels[0])
    return export_dicom_seg(source.input_path, mask, list(source.classes), path, source.model,
                            qc_flag=source.qc_flag)


def _has_dicom_source(source: ExportInput) -> bool:
    """DICOM SEG references its source image: a DICOM X-ray, or a level of a DICOM WSI
    series (files or DICOMweb). An SVS, TIFF or any other slide has no DICOM instance to
    reference. The format is the one provenance recorded; a local input without that record
    (a store written before formats were recorded) is sniffed."""
    wanted = "dicom" if source.kind == "xray" else "dicom-wsi"
    if source.input_format is not None:
        return source.input_format == wanted
    return not is_remote(source.input_path) and sniff(local_path(source.input_path)) == wanted


EXPORTS: Mapping[str, ExportFormat] = {
    "overlay": ExportFormat(_write_overlay, ".overlay.png"),
    "png": ExportFormat(_write_png, ".mask.png"),
    "ome-tiff": ExportFormat(_write_ome_tiff, ".mask.ome.tif"),
    "tiff": ExportFormat(_write_slide_tiff, ".mask.tif"),
    "geojson": ExportFormat(_write_geojson, ".geojson"),
    "dicom-seg": ExportFormat(_write_dicom_seg, ".seg.dcm", _has_dicom_source,
                              "a DICOM source image to reference (a DICOM X-ray or DICOM WSI series; "
                              "an SVS, TIFF or other slide has none)"),  # fmt: skip
}
