"""Which format a file holds, from its content (magic bytes), never from its extension."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pipeline.errors import InputError

log = logging.getLogger(__name__)

Format = Literal["dicom", "png", "jpeg", "tiff", "zarr"]

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


def sniff(path: Path) -> Format:
    """The format of ``path``: a zarr directory, or a file recognised by its first bytes."""
    if path.is_dir():
        if any((path / marker).exists() for marker in _ZARR_MARKERS):
            return "zarr"
        raise InputError(f"{path}: a directory but not a zarr store (no zarr.json/.zarray/.zgroup)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(_DICOM_PREAMBLE + 4)
    if not head:
        raise InputError(f"{path}: empty file (0 bytes)")
    if head[_DICOM_PREAMBLE:] == b"DICM":
        return "dicom"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    raise InputError(
        f"{path}: unknown image format (first bytes {head[:8]!r}); expected DICOM, PNG, "
        "JPEG, TIFF or a zarr directory"
    )


def check_extension(path: Path, fmt: Format) -> bool:
    """Whether the extension agrees with the content; a lying extension only logs a
    warning, because the content decides how the file is read. Real data has them: the
    torchxrayvision V7 lung mask ``16747_3_1_lungmask_v7labs.jpg`` is a PNG."""
    claimed = _EXTENSIONS.get(path.suffix.lower())
    if claimed is not None and claimed != fmt:
        log.warning(
            "%s: extension %r says %s but the content is %s; reading it as %s",
            path,
            path.suffix,
            claimed,
            fmt,
            fmt,
        )
        return False
    return True


_EXTENSIONS: dict[str, Format] = {
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".svs": "tiff",
    ".btf": "tiff",
    ".zarr": "zarr",
}
