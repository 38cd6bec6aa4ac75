"""Which format a file holds, from its content (magic bytes), never from its extension.

Whole-slide files are routed by content too: a DICOM file of the VL Whole Slide Microscopy
SOP Class is 'dicom-wsi' (read with its series, through wsidicom); a TIFF is 'tiff'
(tifffile: SVS, Philips, OME, generic pyramids) unless OpenSlide names a vendor it reads
better (_OPENSLIDE_TIFF_VENDORS: SCN, BIF, Trestle, NDPI); any other content OpenSlide
recognises (MRXS, VMS/VMU, SVSlide, CZI, ...) is 'openslide'. OpenSlide is the optional
'slides' extra: without it those files are unknown, and every TIFF is 'tiff'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pipeline.errors import InputError
from pipeline.io.dicom_series import is_wsi_instance

log = logging.getLogger(__name__)

Format = Literal["dicom", "dicom-wsi", "png", "jpeg", "tiff", "zarr", "openslide"]

_MAGIC: tuple[tuple[bytes, Format], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
_DICOM_PREAMBLE = 128  # 'DICM' follows a 128-byte preamble (PS3.10 7.1)
# TIFF vendors read through OpenSlide. Leica SCN places several images (and an empty
# background) on one canvas; Ventana BIF and Trestle tiles overlap, by amounts given in XML
# or a sidecar file, which OpenSlide stitches: tifffile would read their raw tiles side by
# side. Hamamatsu NDPI tifffile reads exactly (tested: OpenSlide's pixels), but as one zarr
# chunk per JPEG restart interval (8 rows): its 512² regions were 3-10x slower than
# OpenSlide's (benchmarks/wsi_read.py), so tifffile reads NDPI only without OpenSlide. The
# other TIFF vendors (aperio, philips, generic-tiff) tifffile reads exactly and faster.
_OPENSLIDE_TIFF_VENDORS = frozenset({"leica", "ventana", "trestle", "hamamatsu"})


def sniff(path: Path) -> Format:
    """The format of ``path``: a zarr directory, or a file recognised by its first bytes."""
    if path.is_dir():
        if any((path / marker).exists() for marker in _ZARR_MARKERS):
            return "zarr"
        if _holds_dicom_wsi(path):
            return "dicom-wsi"
        raise InputError(f"{path}: a directory but neither a zarr store (no zarr.json/.zarray/"
                         ".zgroup) nor a DICOM whole-slide series")  # fmt: skip
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(_DICOM_PREAMBLE + 4)
    if not head:
        raise InputError(f"{path}: empty file (0 bytes)")
    if head[_DICOM_PREAMBLE:] == b"DICM":
        return "dicom-wsi" if is_wsi_instance(path) else "dicom"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            if name == "tiff" and openslide_vendor(path) in _OPENSLIDE_TIFF_VENDORS:
                return "openslide"
            return name
    if openslide_vendor(path) is not None:
        return "openslide"
    raise InputError(
        f"{path}: unknown image format (first bytes {head[:8]!r}); expected DICOM, PNG, "
        "JPEG, TIFF, a zarr directory or a slide format OpenSlide reads"
    )


def _holds_dicom_wsi(folder: Path) -> bool:
    return any(p.is_file() and is_wsi_instance(p) for p in folder.iterdir() if not p.name.startswith("."))


def openslide_vendor(path: Path) -> str | None:
    """The vendor OpenSlide names for `path` ('aperio', 'mirax', ...), None when OpenSlide
    does not read it or is not installed."""
    try:
        import openslide
    except ImportError:  # the optional 'slides' extra
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # OpenSlide probes the file with its own parsers: unreadable is not ours
        return None



def check_extension(path: Path, fmt: Format) -> bool:
    """Whether the extension agrees with the content; a lying extension only logs a
    warning, because the content decides how the file is read. Real data has them: the
    torchxrayvision V7 lung mask ``16747_3_1_lungmask_v7labs.jpg`` is a PNG."""
    claimed = _EXTENSIONS.get(path.suffix.lower())
    if claimed is not None and fmt not in claimed:
        log.warning(
            "%s: extension %r says %s but the content is %s; reading it as %s",
            path,
            path.suffix,
            claimed[0],
            fmt,
            fmt,
        )
        return False
    return True


_DICOM: tuple[Format, ...] = ("dicom", "dicom-wsi")
_TIFF: tuple[Format, ...] = ("tiff", "openslide")  # a TIFF of a vendor OpenSlide assembles
_EXTENSIONS: dict[str, tuple[Format, ...]] = {
    ".dcm": _DICOM,
    ".dicom": _DICOM,
    ".png": ("png",),
    ".jpg": ("jpeg",),
    ".jpeg": ("jpeg",),
    ".tif": _TIFF,
    ".tiff": _TIFF,
    ".svs": ("tiff",),
    ".btf": _TIFF,
    ".ndpi": ("tiff",),
    ".scn": _TIFF,
    ".bif": _TIFF,
    ".zarr": ("zarr",),
    ".mrxs": ("openslide",),
    ".vms": ("openslide",),
    ".vmu": ("openslide",),
    ".svslide": ("openslide",),
    ".czi": ("openslide",),
}
