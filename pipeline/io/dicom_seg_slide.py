"""DICOM Segmentation of a DICOM whole-slide image: a tiled BINARY SEG (highdicom) on the
total pixel matrix of one level of the source slide, referencing that level's instance.

Which level (`seg_level`): highdicom builds a SEG from a whole pixel array (no frame-by-
frame construction), and the full-resolution mask of a 100k² slide is 10 GB, more than a
run may hold (invariant 3). So the SEG encodes the finest level of the mask pyramid whose
pixels are at most SEG_MAX_PIXELS (16384²: 256 MiB of labels; the export's peak
allocation 296 MiB, 3.3 s, a 12 MB file for a third of it tissue, benchmarks/dicomweb_slide.py)
and that has the size of a level of the source slide, and it references
that level's instance: its pixel spacing is the mask level's, frames line up with the
source's (Spatial Locations Preserved), and a viewer overlays it on the slide without
resampling. A small slide's SEG is at full resolution; a larger one's says in its content
description which fraction of full resolution it holds ("1/4 res"). Sizes match when they
differ by at most a pixel per axis (scanners round a halved odd side either way; the
mask pyramid rounds up): the mask is then cut or padded with background to the source's.

What the SEG carries is the X-ray SEG's (pipeline.io.dicom_seg: patient and study copied
by highdicom, one segment per class, the model as algorithm), tiled like the source
(its tile size), empty frames omitted (TILED_SPARSE), BINARY and uncompressed.
highdicom's `segread` reads it; dcmqi does not handle slide SEGs (it converts volumes:
no total pixel matrix), so it is not checked with dcmqi.

The source's headers come from its instance files (pydicom, no pixel data) or, for a
slide in a PACS, from WADO-RS series metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.cards import ModelId
from pipeline.errors import ConfigError
from pipeline.io.dicom_seg import authored, lo_value, titles
from pipeline.io.export_files import writing

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

SEG_MAX_PIXELS = 1 << 28  # 16384²: the largest mask level a slide's SEG encodes (module doc)
SIZE_SLACK = 1  # pixels per axis a mask level may differ from the source level it encodes


def seg_level(mask_shapes: Sequence[tuple[int, int]], source_shapes: Sequence[tuple[int, int]],
              max_pixels: int = SEG_MAX_PIXELS) -> tuple[int, int] | None:  # fmt: skip
    """(mask level, source level) a slide's SEG encodes and references: the finest mask level
    of at most `max_pixels` whose (h, w) is within SIZE_SLACK of a source level's (the
    source level nearest in size); None when no mask level is."""
    for k, (h, w) in enumerate(mask_shapes):
        if h * w > max_pixels:
            continue
        near = [(abs(sh - h) + abs(sw - w), j) for j, (sh, sw) in enumerate(source_shapes)
                if abs(sh - h) <= SIZE_SLACK and abs(sw - w) <= SIZE_SLACK]  # fmt: skip
        if near:
            return k, min(near)[1]
    return None


def fitted(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`labels` cut or padded with background (0) at the bottom and right to `shape`."""
    out = np.zeros(shape, np.uint8)
    h, w = min(shape[0], labels.shape[0]), min(shape[1], labels.shape[1])
    out[:h, :w] = labels[:h, :w]
    return out


def export_slide_seg(
    source_location: str | Path,
    mask_levels: Sequence[Any],
    class_names: Sequence[str],
    path: str | Path,
    model: ModelId,
    qc_flag: str | None = None,
) -> str:
    """Write a tiled BINARY DICOM Segmentation of the mask pyramid `mask_levels` (level 0
    first; labels k = class_names[k - 1]) of the DICOM WSI at `source_location` (an
    instance file of the series, or a DICOMweb series URI) to `path` (module doc: which
    level it encodes)."""
    import highdicom as hd  # the optional 'dicom' extra

    levels = source_levels(source_location)
    chosen = seg_level([tuple(m.shape) for m in mask_levels], [shape for shape, _ in levels], SEG_MAX_PIXELS)
    if chosen is None:
        sizes = ", ".join(f"{h}x{w}" for (h, w), _ in levels)
        raise ConfigError(f"{path}: no mask level of at most {SEG_MAX_PIXELS} pixels has the size of a level "
                          f"of the source slide ({sizes}); no DICOM SEG written")  # fmt: skip
    k, j = chosen
    shape, header = levels[j][0], with_type2(levels[j][1])
    labels = fitted(np.asarray(mask_levels[k], dtype=np.uint8), shape)
    if labels.max(initial=0) > len(class_names):
        raise ConfigError(f"{path}: label {labels.max()} but only {len(class_names)} class names")
    title, described = titles(model, class_names, qc_flag)
    scale = "full res" if k == 0 else f"1/{2**k} res"
    try:
        seg = hd.seg.Segmentation(
            source_images=[header],
            pixel_array=labels,
            **authored(header, class_names, model),
            content_description=lo_value(f"{scale}; {described}"),  # the level first: LO cuts at 64
            series_description=title,
            tile_pixel_array=True,
            omit_empty_frames=True,
        )
    except Exception as exc:  # highdicom refuses a source it cannot place a SEG on
        raise ConfigError(f"{path}: highdicom cannot build a SEG on this slide: "
                          f"{' '.join(f'{type(exc).__name__}: {exc}'.split())}") from None  # fmt: skip
    if "PatientOrientation" not in seg:
        # type 2C in General Image, required without Image Orientation (Patient), which a
        # slide's SEG has not (its frame is the slide's); highdicom 0.28 leaves it out and
        # dciodvfy reports the error. Present and empty, as for a slide's own images.
        seg.PatientOrientation = None
    with writing(path) as local:
        seg.save_as(local)
    return str(path)


# Type 2 attributes of the Patient and General Study modules that highdicom copies from the
# source and reads unguarded (AttributeError when absent). A source that leaves one out (type
# 2 must be present, possibly empty) gets it empty in the SEG: what the standard allows.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "AccessionNumber")  # fmt: skip


def with_type2(header: Dataset) -> Dataset:
    """`header`, or a copy of it with its absent `_TYPE2` attributes present and empty."""
    missing = [keyword for keyword in _TYPE2 if keyword not in header]
    if not missing:
        return header
    import copy

    header = copy.copy(header)  # shallow: the source's own header is not changed
    for keyword in missing:
        setattr(header, keyword, None)
    return header


def source_levels(location: str | Path) -> list[tuple[tuple[int, int], Dataset]]:
    """((rows, columns), header) of each pyramid level of a DICOM WSI (one VOLUME instance
    per total pixel matrix size, the first by instance number), largest first."""
    from pipeline.io.dicomweb import is_slide_series

    headers = _web_headers(str(location)) if is_slide_series(str(location)) else _file_headers(Path(location))
    by_size: dict[tuple[int, int], Dataset] = {}
    for header in sorted(headers, key=lambda d: int(d.get("InstanceNumber") or 0)):
        image_type = [str(v).upper() for v in header.get("ImageType") or ()]
        if len(image_type) > 2 and image_type[2] == "VOLUME":
            by_size.setdefault((int(header.TotalPixelMatrixRows), int(header.TotalPixelMatrixColumns)), header)
    return sorted(by_size.items(), key=lambda item: -item[0][0] * item[0][1])


def _file_headers(path: Path) -> list[Dataset]:
    import pydicom

    from pipeline.io.dicom_series import series_files

    return [pydicom.dcmread(file, stop_before_pixels=True) for file in series_files(path)]


def _web_headers(uri: str) -> list[Dataset]:
    """The series' instance headers from WADO-RS metadata (Pixel Data's bulk data URI left
    out: a SEG needs no pixels of its source)."""
    from pydicom.dataset import Dataset

    import pipeline.io.dicomweb as dicomweb

    endpoint, series = dicomweb.split_instance(uri)
    try:
        items = dicomweb.client(endpoint).retrieve_series_metadata(series.study, series.series)
    except Exception as exc:
        raise dicomweb.failure(endpoint, "WADO-RS series metadata", exc) from None
    wsi = [item for item in items if dicomweb.attribute_values(item, "SOPClassUID") == (dicomweb.WSI_SOP_CLASS,)]
    return [Dataset.from_json({k: v for k, v in item.items() if k != dicomweb.PIXEL_DATA}) for item in wsi]

