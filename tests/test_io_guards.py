"""Untrusted input is refused with one InputError line naming the file and the cause."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image as PILImage
from pydicom import uid

from pipeline.errors import InputError
from pipeline.io import open_image
from tests.io_fixtures import (
    dicom_dataset,
    write_dicom,
    write_sparse_giant_tiff,
    xray_pixels,
)


def _refused(path: Path, match: str, **limits: int) -> str:
    """Open and read all of ``path``; the InputError raised on the way, checked."""
    with pytest.raises(InputError, match=match) as info, open_image(path, **limits) as image:
        height, width, _ = image.levels[0]
        image.read_region(0, 0, 0, height, width)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR) for width x height greyscale, with one tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    _refused(tmp_path / "empty.png", "empty file")


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello, not an image")
    _refused(tmp_path / "notes.png", "unknown image format")


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.dcm", "no such file")


def test_png_named_dcm_opens_as_png_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "x.dcm").write_bytes((tmp_path / "x.png").read_bytes())
    with open_image(tmp_path / "x.dcm") as image:
        assert image.metadata_safe()["format"] == "png"
    assert "extension '.dcm' says dicom but the content is png" in caplog.text


def test_png_without_extension_opens_as_png(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "image").write_bytes((tmp_path / "x.png").read_bytes())
    with open_image(tmp_path / "image") as image:
        assert image.metadata_safe()["format"] == "png"


def test_png_decompression_bomb_refused_from_header(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_claiming(60_000, 60_000))
    _refused(tmp_path / "bomb.png", "60000x60000 = 3600000000 pixels exceeds max_pixels")


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "x.png")
    _refused(tmp_path / "x.png", "max_pixels=9999", max_pixels=9999)


def test_dicom_bomb_refused_before_decoding(tmp_path: Path) -> None:
    ds = dicom_dataset(xray_pixels(), 12)
    path = write_dicom(tmp_path / "bomb.dcm", ds, uid.RLELossless)
    big = dicom_dataset(xray_pixels(), 12)
    big.Rows = big.Columns = 65_000  # header lies; the RLE frame is tiny
    big.PixelData = ds.PixelData
    big.file_meta.TransferSyntaxUID = uid.RLELossless
    big["PixelData"].is_undefined_length = True
    big.save_as(path, enforce_file_format=True)
    _refused(path, "exceeds max_pixels")


def test_slide_level0_checked_against_max_slide_pixels(tmp_path: Path) -> None:
    path = write_sparse_giant_tiff(tmp_path / "giant.tif", size=8192)
    _refused(
        path,
        "level 0 8192x8192 = 67108864 pixels exceeds max_slide_pixels=1000000",
        max_slide_pixels=1_000_000,
    )


def test_slide_region_larger_than_max_pixels_refused(tmp_path: Path) -> None:
    path = write_sparse_giant_tiff(tmp_path / "giant.tif", size=4096)
    with open_image(path, max_pixels=1 << 20) as image:  # a 512^2 tile fits
        assert image.read_region(0, 0, 0, 512, 512).shape == (512, 512, 1)
    _refused(path, r"region 4096x4096 exceeds max_pixels", max_pixels=1 << 20)


def test_truncated_png(tmp_path: Path) -> None:
    data = imagecodecs.png_encode(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.png", "cut.png: cannot decode")


def test_truncated_jpeg(tmp_path: Path) -> None:
    PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "x.jpg"
    )
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.jpg", "cut.jpg: cannot decode")


@pytest.mark.parametrize(
    "syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEG2000Lossless]
)
def test_truncated_dicom(tmp_path: Path, syntax: str) -> None:
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(xray_pixels(96, 80, 12), 12), syntax)
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - (len(data) - 400) // 2])
    _refused(tmp_path / "cut.dcm", "cut.dcm")
    if syntax == uid.JPEG2000Lossless:  # cut inside encapsulated frames: said so, not "no pixel data"
        _refused(tmp_path / "cut.dcm", "cut.dcm: truncated DICOM: the file ends inside its pixel data")


def test_truncated_tiled_tiff(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (512, 512), np.uint8)
    tifffile.imwrite(tmp_path / "x.tif", pixels, tile=(128, 128), compression="zlib")
    data = (tmp_path / "x.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.tif", "cut.tif")


def test_two_channel_png_refused(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((8, 8, 2), np.uint8), mode="LA").save(tmp_path / "la.png")
    _refused(tmp_path / "la.png", "la.png: 2 channels, expected one of")


def test_five_channel_tiff_refused(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "five.tif",
        np.zeros((16, 16, 5), np.uint8),
        planarconfig="contig",
        photometric="minisblack",
        extrasamples=[0] * 4,
    )
    _refused(tmp_path / "five.tif", "five.tif: 5 channels")


def test_volume_tiff_refused(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "vol.tif", np.zeros((4, 16, 16), np.uint16), photometric="minisblack"
    )
    _refused(tmp_path / "vol.tif", "vol.tif: TIFF series axes")


def test_five_channel_zarr_refused(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "five.zarr", data=np.zeros((16, 16, 5), np.uint8))
    _refused(tmp_path / "five.zarr", "five.zarr: zarr array of shape")


def test_region_outside_image_is_strict(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "x.png")
    with open_image(tmp_path / "x.png") as image:
        for region in [(0, 0, 9, 10), (0, 1, 8, 10), (-1, 0, 2, 2), (0, 0, 0, 5)]:
            with pytest.raises(InputError, match="outside level 0 of 8x10"):
                image.read_region(0, *region)
        with pytest.raises(InputError, match=r"level 1 not in 0\.\.0"):
            image.read_region(1, 0, 0, 1, 1)
