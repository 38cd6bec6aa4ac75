"""DICOM Segmentation export: one BINARY SEG of an X-ray's mask, built with highdicom, that
the field's readers open: highdicom's ``segread``, dcmqi's ``segimage2itkimage`` (what 3D
Slicer loads SEG with) and dicom3tools' ``dciodvfy`` (tests/test_dicom_seg.py runs all three).

What the SEG carries:
- the source's patient and study (the one output allowed to: invariant 8), copied by
  highdicom, and references to the source instance (ReferencedSeriesSequence; each
  frame's SourceImageSequence, Spatial Locations Preserved);
- one segment per class of the model, in the mask or not (an empty segment is valid and
  all three readers accept it), coloured by ``pipeline.display.class_colour`` in CIELab;
- the model's name and version (``cards.ModelId``) as algorithm identification, series
  and content description; segpipe as manufacturer and content creator.

Geometry (``own_frame``). A projection radiograph (CR, DX) has no patient coordinates: no
Image Position/Orientation (Patient), often no Frame of Reference. highdicom then writes a
SEG without plane positions, which the standard allows but dcmqi cannot read: it builds an
ITK image from Plane Orientation, Plane Position and Pixel Measures ("Plane Orientation
(Patient) is missing"; QIICR/dcmqi#319, open since 2017). So such a SEG gets a frame of
reference of its own: a new Frame of Reference UID that nothing else shares, identity
orientation, origin 0, one frame of nominal thickness 1 mm, which is where ITK/GDCM (and
so 3D Slicer) place a projection radiograph: dcmqi's output lies on the X-ray as Slicer
shows it. Its spacing is the source's (``pipeline.io.dicom.pixel_spacing``: PixelSpacing,
else ImagerPixelSpacing; an invalid value such as RG1_UNCR's [0, 0] is never copied), or
without a valid one a nominal 1 mm (ITK's spacing for an image without one), with a
warning. Limit: the frame's axes are not the patient's (a PA chest's columns run to the
feet, not posterior); the anatomy's orientation stays the referenced source's Patient
Orientation. A source with patient coordinates of its own keeps them.

The whole mask is held in memory (the export applies to X-rays: ~2000-4000² uint8). Pixels
are stored uncompressed: highdicom encodes BINARY only as JPEG 2000, which dcmqi refuses
("Cannot decompress").
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from pipeline.cards import ModelId
from pipeline.display import class_colour
from pipeline.errors import ConfigError
from pipeline.io.dicom_geometry import NOMINAL_MM, OwnFrame, own_frame
from pipeline.io.export_files import writing
from pipeline.io.location import is_remote, local_path

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000  # a SEG's series number: its source's plus this
LO_MAX = 64  # characters of a DICOM LO value (descriptions, algorithm name and version)


def export_dicom_seg(
    source_location: str | Path,
    mask: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    model: ModelId,
    qc_flag: str | None = None,
) -> str:
    """Write a BINARY DICOM Segmentation of ``mask`` ((H, W) labels, label k is
    class_names[k - 1]; one segment per class) of the source image (a local path or an
    fsspec URL) to ``path``, naming ``model`` as its algorithm. ``qc_flag``: the reasons of
    a QC-flagged image; its series description then starts "QC flag" (first: an LO value
    is cut at 64 characters) and its content description gives the reasons."""
    import highdicom as hd  # the optional 'dicom' extra, as pydicom

    source = _read_dicom(source_location)
    labels = _checked_labels(mask, source, len(class_names), path)
    frame = own_frame(source)
    if frame is not None and frame.nominal:
        log.warning("%s: the source has no valid PixelSpacing or ImagerPixelSpacing; "
                    "the SEG's pixels are a nominal %s mm", path, NOMINAL_MM)  # fmt: skip
    title, described = titles(model, class_names, qc_flag)
    seg = hd.seg.Segmentation(
        source_images=[source if frame is None else placed(source, frame)],
        pixel_array=labels,
        **authored(source, class_names, model),
        content_description=lo_value(described),
        series_description=title,
    )
    with writing(path) as local:
        seg.save_as(local)
    return str(path)


def titles(model: ModelId, class_names: Sequence[str], qc_flag: str | None) -> tuple[str, str]:
    """(series description, content description) of a SEG: "QC flag" first when flagged
    (an LO value is cut at 64 characters), the reasons as its content."""
    title = lo_value(f"{'QC flag: ' if qc_flag is not None else ''}{model.name} {model.version} segmentation")
    return title, f"QC flag: {qc_flag}" if qc_flag is not None else f"{title}: {', '.join(class_names)}"


def authored(source: Dataset, class_names: Sequence[str], model: ModelId) -> dict[str, Any]:
    """highdicom Segmentation arguments every segpipe SEG shares (X-ray or slide): BINARY,
    one segment per class, new UIDs, segpipe as the device and content creator."""
    import highdicom as hd

    return {
        "segmentation_type": hd.seg.SegmentationTypeValues.BINARY,
        "segment_descriptions": segment_descriptions(class_names, model),
        "series_instance_uid": hd.UID(),
        "series_number": series_number(source),
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": "segpipe",
        "manufacturer_model_name": "segpipe",
        "software_versions": software_version(),
        "device_serial_number": "0",
        "content_creator_name": "segpipe^",  # family name only (a lone word reads as ambiguous)
    }


def _read_dicom(location: str | Path) -> Dataset:
    """The source's header (highdicom needs no pixels), from a local path or through
    fsspec (pydicom reads a file object)."""
    import pydicom

    if not is_remote(location):
        return pydicom.dcmread(local_path(location), stop_before_pixels=True)
    with fsspec.open(str(location), "rb") as f:
        return pydicom.dcmread(f, stop_before_pixels=True)


def _checked_labels(mask: Any, source: Dataset, n_classes: int, path: str | Path) -> np.ndarray:
    """The mask as uint8 labels, refused (ConfigError naming the export) unless it has the
    source's rows and columns and no label beyond the classes."""
    labels = np.asarray(mask, dtype=np.uint8)
    if labels.shape != (source.Rows, source.Columns):
        raise ConfigError(
            f"{path}: mask {labels.shape} does not match the source image "
            f"{(source.Rows, source.Columns)}"
        )
    if labels.max(initial=0) > n_classes:
        raise ConfigError(f"{path}: label {labels.max()} but only {n_classes} class names")
    return labels


# ---------------------------------------------------------------------------------------
# Geometry (the rule: pipeline.io.dicom_geometry)


def placed(source: Dataset, frame: OwnFrame) -> Dataset:
    """A copy of the source's header placed in ``frame`` under a new Frame of Reference
    UID, for highdicom to build the SEG's geometry from. Its SOP Instance UID, and so the
    SEG's references, stay the source's; the source is not changed."""
    import highdicom as hd

    header = copy.deepcopy(source)
    header.FrameOfReferenceUID = hd.UID()
    header.PositionReferenceIndicator = ""  # type 2: no anatomical reference point
    header.ImageOrientationPatient = list(frame.orientation)
    header.ImagePositionPatient = list(frame.position)
    header.PixelSpacing = [_ds(v) for v in frame.pixel_spacing]
    header.SliceThickness = _ds(frame.thickness)
    header.pop("SpacingBetweenSlices", None)
    return header


def _ds(value: float) -> str:
    """A DS string (at most 16 characters) for ``value``."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8e}"


# ---------------------------------------------------------------------------------------
# Segments


def segment_descriptions(class_names: Sequence[str], model: ModelId) -> list[Any]:
    """One highdicom SegmentDescription per class (number k = label k), each coded, coloured
    from the palette and attributed to ``model``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=lo_value(model.name),
        version=lo_value(model.version),
        family=codes.cid7162.ArtificialIntelligence,
        source="segpipe",
    )
    segments = []
    for number, name in enumerate(class_names, start=1):
        category, kind = _property_codes(name)
        segments.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=lo_value(name),
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*class_colour(number)),
        ))  # fmt: skip
    return segments


def _property_codes(name: str) -> tuple[Any, Any]:
    """SNOMED (category, type) codes for a few known class names; any other class is an
    anatomical structure of type 'Tissue', named by its segment label (limit: no full
    terminology mapping)."""
    from pydicom.sr.codedict import codes

    anatomy, abnormal, cell = (codes.SCT.AnatomicalStructure,
                               codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.CellStructure)  # fmt: skip
    known = {
        "lung": (anatomy, codes.SCT.Lung),
        "lungs": (anatomy, codes.SCT.Lung),
        "heart": (anatomy, codes.SCT.Heart),
        "tissue": (anatomy, codes.SCT.Tissue),
        "tumor": (abnormal, codes.SCT.Neoplasm),
        "tumour": (abnormal, codes.SCT.Neoplasm),
        "nucleus": (cell, codes.SCT.Nucleus),
    }
    return known.get(name.lower(), (anatomy, codes.SCT.Tissue))


def lo_value(text: str) -> str:
    """``text`` as a valid LO value: no backslash (DICOM's value separator), at most 64."""
    return text.replace("\\", "/")[:LO_MAX]


def series_number(source: Dataset) -> int:
    try:
        return int(source.get("SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET
    except (TypeError, ValueError):  # a malformed IS string
        return SERIES_NUMBER_OFFSET


def software_version() -> str:
    try:
        return metadata.version("segpipe")
    except metadata.PackageNotFoundError:
        return "unknown"
