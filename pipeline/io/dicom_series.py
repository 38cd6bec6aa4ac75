"""Which files make one DICOM whole-slide image, read from headers only (pydicom, no wsidicom).

A DICOM WSI (VL Whole Slide Microscopy Image, PS3.3 A.32.8) is a series of instances: one
per pyramid level (or several, split by focal plane, optical path or concatenation), plus
label, overview and thumbnail images, all sharing the Series Instance UID. segpipe treats
the series as one image: discovery keeps one file per series (`series_key`), and the reader
opened on any of its files (or on a folder holding one series) reads the whole series from
that file's folder (`series_files`).

Only the header is read: 132 bytes to see a DICOM file, its file meta group for the SOP
Class, and the dataset up to the Series Instance UID (0020,000E). A sparse-tiled instance's
per-frame sequence, which comes later and may hold 100 000 items, is never parsed here.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pipeline.errors import InputError

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_PREAMBLE = 128  # 'DICM' follows a 128-byte preamble (PS3.10 7.1)
_SERIES_UID_TAG = 0x0020000E


def is_wsi_instance(path: Path) -> bool:
    """Whether `path` is a DICOM file of the VL Whole Slide Microscopy Image SOP Class."""
    try:
        with path.open("rb") as handle:
            if handle.read(_PREAMBLE + 4)[_PREAMBLE:] != b"DICM":
                return False
    except OSError:
        return False
    return _sop_class(path) == WSI_SOP_CLASS


def series_key(path: Path) -> tuple[str, str] | None:
    """(folder, Series Instance UID) of a DICOM WSI instance, None for any other file: the
    instances of one slide share it, so discovery keeps one file per key."""
    if not is_wsi_instance(path):
        return None
    uid = _series_uid(path)
    return (str(path.resolve().parent), uid) if uid else None


def series_files(path: Path) -> list[Path]:
    """The instance files of the slide `path` stands for, in name order: for a WSI instance
    file, the WSI files beside it in its folder with its Series Instance UID; for a folder,
    the WSI files in it, which must be of one series."""
    if path.is_dir():
        series = _series_in(path)
        if len(series) != 1:
            found = "no DICOM whole-slide instances" if not series else f"{len(series)} slide series"
            raise InputError(f"{path}: a folder with {found}; expected the instances of one slide "
                             "(name one instance file to choose its series)")  # fmt: skip
        return next(iter(series.values()))
    if not is_wsi_instance(path):
        raise InputError(f"{path}: not a DICOM VL Whole Slide Microscopy instance")
    uid = _series_uid(path)
    if uid is None:
        raise InputError(f"{path}: DICOM WSI instance without a Series Instance UID")
    return _series_in(path.resolve().parent).get(uid, [path])


def members(path: Path) -> list[Path] | None:
    """The files whose bytes are the image `path` stands for, when that is more than the
    file itself (a DICOM WSI series: its instance files); None for any other input."""
    if path.is_dir():
        has_wsi = any(p.is_file() and is_wsi_instance(p) for p in path.iterdir() if not p.name.startswith("."))
        return series_files(path) if has_wsi else None
    return series_files(path) if is_wsi_instance(path) else None


def _series_in(folder: Path) -> dict[str, list[Path]]:
    """Series Instance UID -> the WSI instance files directly in `folder` (name order)."""
    series: dict[str, list[Path]] = defaultdict(list)
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file() or not is_wsi_instance(file):
            continue
        uid = _series_uid(file)
        if uid:
            series[uid].append(file)
    return dict(series)


def _sop_class(path: Path) -> str | None:
    try:
        from pydicom.filereader import read_file_meta_info
    except ImportError:  # pydicom is the 'dicom' extra: without it the DICOM reader says so
        return None
    try:
        meta = read_file_meta_info(path)
    except Exception:  # a damaged meta group: not a readable instance of any class
        return None
    value = meta.get("MediaStorageSOPClassUID")
    return str(value) if value else None


def _series_uid(path: Path) -> str | None:
    """The Series Instance UID, reading the dataset only up to it."""
    from pydicom.filereader import read_partial

    def past_series_uid(tag: int, vr: str | None, length: int) -> bool:
        return tag > _SERIES_UID_TAG

    try:
        with path.open("rb") as handle:
            dataset = read_partial(handle, stop_when=past_series_uid)
    except Exception:  # a truncated or garbled header: the reader says what is wrong
        return None
    value = dataset.get("SeriesInstanceUID")
    return str(value) if value else None
