"""Selection: which of the discovered images the run takes, by the rules of
`pipeline.selection` over each image's DICOM header (no pixel is read). A DICOMweb source's
header came with its query (nothing is fetched to decide); a file's is read up to its pixel
data (a remote object's through fsspec, a ranged read on object storage).

An input that is not DICOM has no DICOM attributes: the rules do not apply to it. A header
that cannot be read leaves the image selected: its own run says what is wrong with it in
one line, as it would without rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec

from flows.discover import Source
from pipeline.io.dicom import read_header
from pipeline.io.sniff import sniff
from pipeline.selection import Header, Rule, keywords, not_selected

log = logging.getLogger(__name__)

HEADER_THREADS = 8  # headers read at once: remote ones wait on storage
_PREAMBLE = 128  # 'DICM' follows a 128-byte preamble (PS3.10 7.1)
_DICOM_SUFFIXES = ("", ".dcm", ".dicom")  # remote objects worth a ranged read of their header


def not_selected_sources(sources: Sequence[Source], rules: Sequence[Rule]) -> dict[str, str]:
    """image id -> skip reason ("not selected: BodyPartExamined=EXTREMITY") of each source
    the rules do not select."""
    if not rules:
        return {}
    wanted = keywords(rules)
    with ThreadPoolExecutor(HEADER_THREADS) as pool:
        headers = list(pool.map(lambda s: header_of(s, wanted), sources))
    reasons = {s.image_id: why for s, h in zip(sources, headers, strict=True)
               if (why := not_selected(rules, h)) is not None}  # fmt: skip
    if reasons:  # by count and reason: one line however large the archive
        counts = Counter(why.removeprefix("not selected: ") for why in reasons.values())
        log.info("%d images not selected: %s", len(reasons), ", ".join(f"{n} {why}" for why, n in counts.most_common()))
    return reasons


def header_of(source: Source, keywords: Sequence[str]) -> Header | None:
    """The source's DICOM attributes `keywords` (None: not a DICOM, or unreadable)."""
    if source.header is not None:
        return source.header
    try:
        if source.is_remote:
            if Path(source.name).suffix.lower() not in _DICOM_SUFFIXES:  # a PNG on S3: no request for it
                return None
            with fsspec.open(source.uri, "rb") as f:
                if f.read(_PREAMBLE + 4)[_PREAMBLE:] != b"DICM":
                    return None
                f.seek(0)
                return read_header(f, keywords)
        path = Path(source.uri.removeprefix("file://"))
        return read_header(path, keywords) if sniff(path) == "dicom" else None
    except Exception:  # unreadable, gone, refused: the image's own run reports it
        return None
