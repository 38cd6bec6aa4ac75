"""Image I/O: open any supported input as an ``Image``, resample, ingest to zarr, export.

``open_image`` sniffs the content (magic bytes, not the extension) and dispatches to one
reader per format: dicom.py (X-rays), dicom_wsi.py (DICOM whole-slide series, wsidicom),
dicom_wsi_web.py (the same from a PACS over DICOMweb), raster.py (PNG/JPEG), tiff.py
(TIFF, SVS, NDPI, Philips, OME-TIFF), zarr_image.py (zarr, OME-Zarr), openslide_image.py
(MRXS, SCN, BIF, VMS/VMU and OpenSlide's other formats). See ingest.py for which path each
format takes to zarr.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SLIDE_PIXELS
from pipeline.io.dicomweb import is_slide_series
from pipeline.io.image import Image, Limits, level_mpp, select_level, to_channels
from pipeline.io.ingest import (
    ingest,
    picture_level,
    picture_source,
    preview,
    read_in_place,
)
from pipeline.io.raster import RasterImage
from pipeline.io.resample import resize
from pipeline.io.sniff import check_extension, sniff
from pipeline.io.tiff import TiffImage
from pipeline.io.zarr_image import ZarrImage

__all__ = [
    "Image",
    "Limits",
    "ingest",
    "level_mpp",
    "open_image",
    "picture_level",
    "picture_source",
    "preview",
    "read_in_place",
    "resize",
    "select_level",
    "to_channels",
]


def open_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_slide_pixels: int = DEFAULT_MAX_SLIDE_PIXELS,
) -> Image:
    """Open ``path`` for reading, by its content; refuse (InputError) empty, unknown,
    oversized or malformed inputs before any pixel is decoded. An extension that names
    another format than the content is logged as a warning.

    Pass RunConfig.max_pixels / max_slide_pixels; see image.Limits for what each bounds.
    """
    limits = Limits(max_pixels=max_pixels, max_slide_pixels=max_slide_pixels)
    if is_slide_series(str(path)):  # a slide in a PACS: read frame by frame, nothing to sniff
        # wsidicom is the optional 'slides' extra
        from pipeline.io.dicom_wsi_web import DicomWebWsiImage

        return DicomWebWsiImage(str(path), limits)
    path = Path(path)
    fmt = sniff(path)
    check_extension(path, fmt)
    return READERS[fmt](path, fmt, limits)


def _dicom(path: Path, fmt: str, limits: Limits) -> Image:
    from pipeline.io.dicom import DicomImage  # pydicom is the optional 'dicom' extra

    return DicomImage(path, limits)


def _dicom_wsi(path: Path, fmt: str, limits: Limits) -> Image:
    from pipeline.io.dicom_wsi import (
        DicomWsiImage,  # wsidicom is the optional 'slides' extra
    )

    return DicomWsiImage(path, limits)


def _openslide(path: Path, fmt: str, limits: Limits) -> Image:
    from pipeline.io.openslide_image import (
        OpenSlideImage,  # the optional 'slides' extra
    )

    return OpenSlideImage(path, limits)


# One reader per sniffed format (pipeline.io.sniff.Format), as tifffile dispatches its
# series kinds: a new format is one line here and one reader module.
READERS: dict[str, Callable[[Path, str, Limits], Image]] = {
    "dicom": _dicom,
    "dicom-wsi": _dicom_wsi,
    "png": RasterImage,
    "jpeg": RasterImage,
    "tiff": lambda path, fmt, limits: TiffImage(path, limits),
    "zarr": lambda path, fmt, limits: ZarrImage(path, limits),
    "openslide": _openslide,
}
