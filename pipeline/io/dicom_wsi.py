"""DICOM whole-slide images (VL Whole Slide Microscopy Image) through wsidicom.

The image is a series of instances (see dicom_series.py for which files make it); wsidicom
groups them into a pyramid, joins concatenations, maps tiles to frames for full and sparse
tiling (TILED_FULL / TILED_SPARSE) and decodes only the frames a region touches, keeping
decoded frames in its own bounded cache (100 MB decoded, 100 MB encoded per open slide).

Levels are wsidicom's pyramid (the first one, as tifffile's first series): ordered by the
pixel spacing of each level's Pixel Measures, level 0 the finest; `mpp` is level 0's column
spacing in µm. Quirk: wsidicom refuses to build a pyramid when level 0 has no Pixel Spacing
(it orders levels by spacing); such a series is read instance by instance instead, levels
ordered by size, with no mpp (the run then works at the slide's own scale, as for any image
without a pixel size). Limit: its levels' scale factors are then not checked to be powers
of two.

Absent frames of a sparse instance are background (wsidicom's blank tile: white for colour,
black for grey), not errors. A level with several focal planes or optical paths is read at
wsidicom's default: the middle focal plane, the first optical path.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from wsidicom import WsiDicom, WsiInstance
from wsidicom.errors import WsiDicomNoResolutionError
from wsidicom.file import WsiDicomFileSource
from wsidicom.geometry import Point, Region, Size
from wsidicom.source import Source
from wsidicom.thread import ReadExecutor

from pipeline.errors import InputError
from pipeline.io.dicom_series import series_files
from pipeline.io.image import Image, Kind, Limits, check_chunk_size, one_line

# wsidicom logs a file it skips with its path and a traceback; the reader refuses the series
# in one line instead (_check_all_opened), and paths may name the patient (invariant 8).
logging.getLogger("wsidicom.file.wsidicom_file_source").addFilter(
    lambda record: record.levelno < logging.WARNING
)


class DicomWsiImage(Image):
    """The pyramid of one DICOM WSI series, one wsidicom instance per level."""

    kind: Kind = "slide"

    def __init__(self, path: Path, limits: Limits) -> None:
        files = series_files(path)
        try:
            source = WsiDicomFileSource.open(files)
        except Exception as exc:  # wsidicom and pydicom raise many types on bad headers
            raise InputError(f"{path}: unreadable DICOM WSI: {one_line(exc)}") from exc
        try:
            _check_all_opened(path, files, source)
        except InputError:
            source.close()
            raise
        self._open_pyramid(path, source, limits)

    def _open_pyramid(self, where: Any, source: Source, limits: Limits) -> None:
        """Take `source`'s pyramid as this image's levels (closing it on a refusal):
        `where` names the image in errors (a path, or a DICOMweb series' URI)."""
        self._source = source
        try:
            self._instances, mpp = _pyramid(source)
            if not self._instances:
                raise InputError(f"{where}: DICOM WSI series without a VOLUME (pyramid) instance")
            first = self._instances[0].image_data
            levels = [(i.size.height, i.size.width, first.samples_per_pixel) for i in self._instances]
            super().__init__(where, levels, mpp, first.dtype, limits)
            for instance in self._instances:
                check_chunk_size(where, (instance.tile_size.height, instance.tile_size.width), limits)
        except InputError:
            source.close()
            raise
        except Exception as exc:  # an inconsistent series: levels not a pyramid, bad tiling
            source.close()
            raise InputError(f"{where}: unreadable DICOM WSI structure: {one_line(exc)}") from exc

    @property
    def format_name(self) -> str:
        return "dicom-wsi"

    def metadata_safe(self) -> dict[str, Any]:
        """Facts without identifiers: no UIDs, no file names (they may name the patient)."""
        meta = super().metadata_safe()
        base = self._instances[0]
        meta.update(
            transfer_syntax=str(base.image_data.transfer_syntax),
            tile=[base.tile_size.height, base.tile_size.width],
            tiling=[i.dataset.tile_type.value for i in self._instances],
            focal_planes=len(base.focal_planes),
            optical_paths=len(base.optical_paths),
            modality=_modality(base),  # a code (SM), for the card's modality check
        )
        return meta

    def lazy_level(self, level: int) -> Any:
        from pipeline.io.ingest import lazy_regions  # dask: only for lazy reads

        tile = self._instances[level].tile_size
        return lazy_regions(self, level, (tile.height, tile.width))

    def _read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        instance = self._instances[level]
        region = Region(Point(x, y), Size(w, h))
        with ReadExecutor(1) as executor:  # one thread: the tile runner already reads in two
            pixels = instance.get_region(region, instance.default_z, instance.default_path,
                                         executor=executor)  # fmt: skip
        return pixels[..., None] if pixels.ndim == 2 else pixels

    def close(self) -> None:
        self._source.close()


def _check_all_opened(path: Path, files: list[Path], source: WsiDicomFileSource) -> None:
    """Quirk: wsidicom skips an instance it cannot parse (a header cut short) with a log
    line and builds the pyramid from the rest: a damaged level 0 would make level 1 the
    slide. Every file of the series must have been opened. (Levels whose tile size differs
    from level 0's are left out of the pyramid by wsidicom: fewer levels, same pixels.)"""
    opened = {Path(str(file)).resolve() for file in source.files}
    missing = [file for file in files if file.resolve() not in opened]
    if missing:  # not named: a sibling's file name may name the patient (invariant 8)
        raise InputError(f"{path}: {len(missing)} of the series' {len(files)} instance files are "
                         "unreadable (truncated or damaged header)")  # fmt: skip


def _pyramid(source: Source) -> tuple[list[WsiInstance], float | None]:
    """One instance per level, finest first, and level 0's µm per pixel (None: no spacing)."""
    try:
        slide = WsiDicom(source, source_owned=False)
    except WsiDicomNoResolutionError:
        # wsidicom orders levels by Pixel Spacing and needs it on level 0; without it the
        # levels are ordered by size, and no pixel size is claimed
        by_size: dict[tuple[int, int], WsiInstance] = {}
        for instance in source.level_instances:
            by_size.setdefault((instance.size.width, instance.size.height), instance)
        return sorted(by_size.values(), key=lambda i: -i.size.width), None
    levels = list(slide.levels)
    if not levels:
        return [], None
    mpp = levels[0].mpp.width  # µm per pixel along x (columns), as every reader reports
    return [level.default_instance for level in levels], float(mpp) if mpp > 0 else None


def _modality(instance: WsiInstance) -> str:
    """The instance's Modality (SM for a slide); wsidicom keeps the pydicom header it read
    private (`WsiDataset._dataset`), and has no accessor for it."""
    header = getattr(instance.dataset, "_dataset", None)
    return str(header.get("Modality", "") or "").strip() if header is not None else ""
