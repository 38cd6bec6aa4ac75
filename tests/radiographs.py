"""Radiographs with realistic headers for the selection and PACS tests: a chest CR (PA), a
leg CR (BodyPartExamined EXTREMITY, as pydicom-data's RG3), a chest CT localizer, each in
a study of its own on a day of its own, with the fixtures' patient identifiers set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom import uid
from pydicom.dataset import Dataset

from tests.io_fixtures import dicom_dataset, write_dicom, xray_pixels


@dataclass(frozen=True)
class Kind:
    """What a radiograph's header says it is."""

    modality: str
    body_part: str
    view: str | None = None
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    sop_class: str = uid.ComputedRadiographyImageStorage


CHEST = Kind("CR", "CHEST", "PA")
LEG = Kind("CR", "EXTREMITY", "AP")  # pydicom-data RG3_UNCR: a leg, BodyPartExamined EXTREMITY
CT_LOCALIZER = Kind("CT", "CHEST", None, ("ORIGINAL", "PRIMARY", "LOCALIZER"), uid.CTImageStorage)


def radiograph(kind: Kind, study_date: str, size: tuple[int, int] = (64, 48), seed: int = 0) -> Dataset:
    """A single-frame radiograph of `kind` in a study of its own dated `study_date`."""
    ds = dicom_dataset(xray_pixels(*size, 12), 12)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = kind.sop_class
    ds.Modality = kind.modality
    ds.BodyPartExamined = kind.body_part
    ds.ImageType = list(kind.image_type)
    if kind.view:
        ds.ViewPosition = kind.view
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.SeriesNumber = 1 + seed
    ds.StudyDescription = f"{kind.body_part} {kind.modality}"
    return ds


def write(folder: Path, name: str, ds: Dataset) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_dicom(folder / name, ds)
