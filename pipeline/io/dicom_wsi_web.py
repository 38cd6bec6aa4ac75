"""A DICOM whole-slide image in a PACS, read through DICOMweb (wsidicom's web source over
the run's dicomweb-client session: pipeline/io/dicomweb.py's credentials and errors).

The image is a VL Whole Slide Microscopy series, named `dicomweb+<root>/studies/<s>/series/<se>`.
Opening it reads each instance's WADO-RS metadata (no pixel data); a region then fetches
only the frames it touches, one WADO-RS frames request per region (frames retrieved by
number, absent frames of a sparse instance never asked for), kept in wsidicom's bounded
caches. The series is never downloaded whole: levels the run does not read (level 0 when
the model works on a coarser one and the picture starts below it) are not fetched at all.
Levels, spacing and sparse rules are the file reader's (pipeline/io/dicom_wsi.py).

Transfer syntax (quirk): frames are asked for in the syntax the instance is stored in, so
nothing is transcoded. A PACS that lists it (QIDO-RS AvailableTransferSyntaxUID) is
believed (wsidicom's preference order among those listed, JPEG first). One that does not
(Orthanc 1.10) is asked for the syntax the header implies: YBR_FULL_422 pixels are JPEG
Baseline, YBR_ICT JPEG 2000, YBR_RCT JPEG 2000 lossless (PS3.5 8.2); anything else
Explicit VR Little Endian, which every DICOMweb server serves for frames (PS3.18 8.7.3.5)
and is never lossy (limit: an RGB JPEG slide then travels uncompressed, decoded by the
PACS). wsidicom would otherwise probe each instance by fetching frame 1 in each syntax
it tries, JPEG first, which a transcoding PACS answers with a lossy re-encoding of an
uncompressed slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import requests
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from wsidicom.web import WsiDicomWebClient
from wsidicom.web.wsidicom_web_source import WsiDicomWebSource

import pipeline.io.dicomweb as dicomweb
from pipeline.errors import InputError, SegpipeError
from pipeline.io.dicom_wsi import DicomWsiImage
from pipeline.io.image import Limits, one_line

# Photometric interpretations only a compressed syntax carries (PS3.5 8.2): the syntax an
# instance with them is stored in.
STORED_AS = {"YBR_FULL_422": JPEGBaseline8Bit, "YBR_ICT": JPEG2000, "YBR_RCT": JPEG2000Lossless}


class _Client(WsiDicomWebClient):
    """wsidicom's client, asked which syntax a PACS serves only when the PACS did not list
    the ones it holds: the one the header implies, without a probing request (module doc)."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._stored: dict[str, UID] = {}  # SOP Instance UID -> the syntax its header implies

    def get_instance(self, study_uid: UID, series_uid: UID, instance_uid: UID) -> Dataset:
        """The instance's WADO-RS metadata without Pixel Data: it comes as a bulk data URI,
        which pydicom warns it cannot resolve, and wsidicom reads frames by number."""
        item = self._client.retrieve_instance_metadata(study_uid, series_uid, instance_uid)
        item.pop(dicomweb.PIXEL_DATA, None)
        header = Dataset.from_json(item)
        photometric = str(header.get("PhotometricInterpretation", "")).strip()
        self._stored[str(instance_uid)] = STORED_AS.get(photometric, ExplicitVRLittleEndian)
        return header

    def get_frames(self, study_uid: UID, series_uid: UID, instance_uid: UID, frame_indices: list[int],
                   transfer_syntax: UID) -> Iterator[bytes]:  # fmt: skip
        """Quirk: dicomweb-client 0.61 gives frames as bytearrays; wsidicom sets an
        uncompressed one as a dataset's PixelData, which pydicom then takes for a list of
        values ("a bytes-like object is required, not 'list'"). Limit: one copy per frame."""
        for frame in super().get_frames(study_uid, series_uid, instance_uid, frame_indices, transfer_syntax):
            yield bytes(frame)

    def is_transfer_syntax_supported(self, study_uid: UID, series_uid: UID, instance_uid: UID,
                                     transfer_syntax: UID) -> bool:  # fmt: skip
        return transfer_syntax == self._stored.get(str(instance_uid), ExplicitVRLittleEndian)


class DicomWebWsiImage(DicomWsiImage):
    """A DICOM WSI series in a PACS: the file reader's pyramid over wsidicom's web source."""

    def __init__(self, uri: str, limits: Limits) -> None:
        self._endpoint, series = dicomweb.split_instance(uri)
        if not series.is_series:
            raise InputError(f"{uri}: a DICOMweb instance, not a slide series")
        try:
            source = WsiDicomWebSource(_Client(dicomweb.client(self._endpoint)), UID(series.study),
                                       [UID(series.series)])  # fmt: skip
        except SegpipeError:
            raise
        except requests.RequestException as exc:  # one line naming the service root, no URL
            raise dicomweb.failure(self._endpoint, "WADO-RS slide series metadata", exc) from None
        except Exception as exc:  # no level instance, a header wsidicom refuses
            raise InputError(f"{uri}: unreadable DICOM WSI series: {one_line(exc)}") from None
        self._open_pyramid(uri, source, limits)

    def metadata_safe(self) -> dict[str, Any]:
        return {**super().metadata_safe(), "source": "dicomweb"}

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """The file reader's read; a request that failed is the PACS's error (one line
        naming its service root; an OSError, which the I/O tasks retry, when it may pass),
        not a decoding error of the image."""
        try:
            return super().read_region(level, y, x, h, w)
        except InputError as exc:
            if isinstance(exc.__cause__, requests.RequestException):
                raise dicomweb.failure(self._endpoint, "WADO-RS frames", exc.__cause__) from None
            raise
