"""DICOM X-rays (pydicom 3 and its pylibjpeg/pyjpegls decoders).

Output: float32 (H, W, 1) in modality units: Rescale Slope/Intercept applied, MONOCHROME1
inverted so that every X-ray has bright bone and dark air. float32 rather than uint16
because slope/intercept may be fractional or negative. The frame is decoded once, on the
first read, and kept (X-rays are ~2000^2; the header's size was checked at open).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.errors import InputError
from pipeline.io.dicom_geometry import pixel_spacing
from pipeline.io.image import Image, Kind, Limits, one_line

_COMPRESSED_SYNTAXES = "JPEG baseline, JPEG lossless, JPEG-LS, JPEG 2000, RLE"

# A file cut inside its encapsulated (compressed) pixel data: pydicom drops the element
# with this warning (and the same log line), and the reader says it in one line of its own
# (`_checked_geometry`): the warning would only add two lines of pydicom's to the terminal.
_CUT_MESSAGE = "End of file reached before delimiter"
warnings.filterwarnings("ignore", message=_CUT_MESSAGE)
logging.getLogger("pydicom").addFilter(lambda record: _CUT_MESSAGE not in record.getMessage())
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as it lies in a little-endian file


class DicomImage(Image):
    """One single-frame greyscale DICOM image."""

    kind: Kind = "xray"

    def __init__(self, path: Path, limits: Limits) -> None:
        self._dataset = _read_dataset(path)
        rows, columns = _checked_geometry(path, self._dataset)
        super().__init__(
            path, [(rows, columns, 1)], _mpp(self._dataset), np.dtype(np.float32), limits
        )
        self._pixels: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def format_name(self) -> str:
        return "dicom"

    def dicom_dataset(self) -> Dataset:
        """The full pydicom dataset, patient identifiers included: only for DICOM SEG export,
        which must reference the source study. Never log or store it."""
        return self._dataset

    def metadata_safe(self) -> dict[str, Any]:
        meta = super().metadata_safe()
        ds = self._dataset
        meta.update(
            modality=str(ds.get("Modality", "")),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
            bits_stored=int(ds.get("BitsStored", 0)),
            photometric=str(ds.get("PhotometricInterpretation", "")),
        )
        return meta

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._decoded()[y : y + h, x : x + w].copy()  # the cache must not be mutated

    def _decoded(self) -> np.ndarray:
        with self._lock:
            if self._pixels is None:
                self._pixels = _to_modality(self._dataset)[..., None]
            return self._pixels


def _read_dataset(path: Path) -> Dataset:
    try:
        # pixel data is read only when first decoded, after the size checks
        return pydicom.dcmread(path, defer_size="1 MB")
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise InputError(f"{path}: unreadable DICOM: {one_line(exc)}") from exc


def _checked_geometry(path: Path, ds: Dataset) -> tuple[int, int]:
    """Rows and columns from the header, after refusing what this reader cannot handle."""
    if "PixelData" not in ds:
        if _PIXEL_DATA_TAG in path.read_bytes():
            raise InputError(f"{path}: truncated DICOM: the file ends inside its pixel data")
        raise InputError(f"{path}: DICOM without pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InputError(f"{path}: multi-frame DICOM ({frames} frames); only single frames")
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise InputError(f"{path}: {samples} samples per pixel; expected greyscale (1)")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{path}: PhotometricInterpretation {photometric!r}, expected MONOCHROME1/2"
        )
    bits = int(ds.get("BitsStored", 0))
    if not 1 <= bits <= 16:
        raise InputError(f"{path}: BitsStored={bits}, expected 1..16")
    return int(ds.Rows), int(ds.Columns)


def _mpp(ds: Dataset) -> float | None:
    """Micrometres per pixel of a column step (the x pixel size), from ``pixel_spacing``."""
    spacing = pixel_spacing(ds)
    return None if spacing is None else spacing[1] * 1000.0


def _to_modality(ds: Dataset) -> np.ndarray:
    """Decode the frame, invert MONOCHROME1 over the stored range, apply slope/intercept."""
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoder plugins raise their own types on truncated data
        syntax = ds.file_meta.get("TransferSyntaxUID", "?")
        raise InputError(
            f"{ds.filename}: cannot decode pixel data ({syntax}; supported compressed: "
            f"{_COMPRESSED_SYNTAXES}): {one_line(exc)}"
        ) from exc
    pixels = stored.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        pixels = np.float32(low + high) - pixels
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels * np.float32(slope) + np.float32(intercept)


def read_header(source: Any, keywords: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The values of `keywords` in a DICOM file's header (a path or a binary file object),
    without its pixel data: keyword -> its values as strings (an absent or empty attribute
    is left out). For selection rules (pipeline.selection), which read headers only."""
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=list(keywords))
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise InputError(f"{source}: unreadable DICOM header: {one_line(exc)}") from exc
    header: dict[str, tuple[str, ...]] = {}
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        values = tuple(str(v) for v in value) if isinstance(value, MultiValue) else (str(value),)
        header[keyword] = values
    return header
