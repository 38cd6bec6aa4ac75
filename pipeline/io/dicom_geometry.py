"""What a DICOM image's header says about where its pixels lie, as pure functions over a
header (a pydicom Dataset, read only; no pydicom import here): the image's pixel spacing
(``pixel_spacing``, for the reader's µm/px and DICOM SEG alike) and the patient geometry a
DICOM SEG of it gets (``own_frame``; why, in ``pipeline.io.dicom_seg``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NOMINAL_MM = 1.0  # spacing and thickness where the source gives none (ITK's default)


def pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing (a projection
    radiograph's spacing at the detector), the first whose two values are finite and
    positive; None when neither is. Sources do carry invalid ones: pydicom-data's
    RG1_UNCR (Philips CR) has PixelSpacing [0, 0]."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in ds.get(keyword) or ()]
        except (TypeError, ValueError):  # a malformed DS string
            continue
        if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return None


@dataclass(frozen=True)
class OwnFrame:
    """The patient geometry a SEG gives itself when its source has none (why this one:
    ``pipeline.io.dicom_seg``): identity orientation, origin 0, one frame NOMINAL_MM thick."""

    pixel_spacing: tuple[float, float]  # mm, (row, column)
    nominal: bool  # the source has no valid spacing: NOMINAL_MM

    orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    position = (0.0, 0.0, 0.0)
    thickness = NOMINAL_MM


def own_frame(source: Any) -> OwnFrame | None:
    """None when the source has patient coordinates for highdicom to copy (Frame of
    Reference UID, Image Position and Orientation (Patient), valid Pixel Spacing and Slice
    Thickness: a cross-sectional slice); else the frame the SEG gets (a projection
    radiograph, or a source whose geometry is incomplete)."""
    if _has_patient_geometry(source):
        return None
    spacing = pixel_spacing(source)
    if spacing is None:
        return OwnFrame((NOMINAL_MM, NOMINAL_MM), nominal=True)
    return OwnFrame(spacing, nominal=False)


def _has_patient_geometry(source: Any) -> bool:
    try:
        position = [float(v) for v in source.get("ImagePositionPatient") or ()]
        orientation = [float(v) for v in source.get("ImageOrientationPatient") or ()]
        spacing = [float(v) for v in source.get("PixelSpacing") or ()]
        thickness = float(source.get("SliceThickness") or 0)
    except (TypeError, ValueError):  # a malformed DS string
        return False
    return (
        "FrameOfReferenceUID" in source
        and len(position) == 3
        and len(orientation) == 6
        and all(math.isfinite(v) for v in position + orientation)
        and len(spacing) == 2
        and all(math.isfinite(v) and v > 0 for v in spacing)
        and math.isfinite(thickness)
        and thickness > 0
    )
