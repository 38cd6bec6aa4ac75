"""X-ray readers: DICOM in every transfer syntax, PNG, JPEG, plain TIFF; channel conversion."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage
from pydicom import uid

from pipeline.errors import InputError
from pipeline.io import open_image, to_channels
from tests.io_fixtures import PATIENT, dicom_dataset, write_dicom, xray_pixels

LOSSLESS = [
    uid.ExplicitVRLittleEndian,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.RLELossless,
]


def _full(image):
    height, width, _ = image.levels[0]
    return image.read_region(0, 0, 0, height, width)


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: s.name.split()[0] + s[-3:])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_dicom_lossless_syntaxes_round_trip(tmp_path: Path, syntax: str, bits: int) -> None:
    pixels = xray_pixels(bits=bits)
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(pixels, bits), syntax)
    with open_image(path) as image:
        assert image.kind == "xray"
        assert image.levels == [(48, 40, 1)]
        assert image.dtype == np.float32
        np.testing.assert_array_equal(_full(image)[..., 0], pixels)


def test_dicom_jpeg_baseline_8bit_is_close(tmp_path: Path) -> None:
    pixels = xray_pixels(bits=8)
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(pixels, 8), uid.JPEGBaseline8Bit)
    with open_image(path) as image:
        decoded = _full(image)[..., 0]
    assert np.abs(decoded - pixels).mean() < 2.0  # lossy, quality 95


def test_dicom_monochrome1_reads_like_monochrome2(tmp_path: Path) -> None:
    pixels = xray_pixels(bits=12)
    mono2 = write_dicom(tmp_path / "m2.dcm", dicom_dataset(pixels, 12, "MONOCHROME2"))
    inverted = (4095 - pixels).astype(np.uint16)
    mono1 = write_dicom(tmp_path / "m1.dcm", dicom_dataset(inverted, 12, "MONOCHROME1"))
    with open_image(mono1) as one, open_image(mono2) as two:
        np.testing.assert_array_equal(_full(one), _full(two))


def test_dicom_rescale_slope_intercept_applied(tmp_path: Path) -> None:
    pixels = xray_pixels(bits=12)
    ds = dicom_dataset(pixels, 12, RescaleSlope=0.5, RescaleIntercept=-1024)
    with open_image(write_dicom(tmp_path / "x.dcm", ds)) as image:
        np.testing.assert_allclose(_full(image)[..., 0], pixels * 0.5 - 1024)


@pytest.mark.parametrize(
    ("attributes", "mpp"),
    [
        ({"PixelSpacing": [0.139, 0.143]}, 143.0),
        ({"ImagerPixelSpacing": [0.2, 0.2]}, 200.0),
        ({"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.15, 0.15]}, 150.0),
        ({}, None),
    ],
)
def test_dicom_pixel_spacing_gives_mpp(tmp_path: Path, attributes: dict, mpp: float | None) -> None:
    ds = dicom_dataset(xray_pixels(), 12, **attributes)
    with open_image(write_dicom(tmp_path / "x.dcm", ds)) as image:
        assert image.mpp == pytest.approx(mpp)


def test_dicom_without_extension_recognised_by_preamble(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "IM000001", dicom_dataset(xray_pixels(), 12))
    with open_image(path) as image:
        assert image.metadata_safe()["format"] == "dicom"


def test_dicom_metadata_safe_has_no_patient_identifiers(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", dicom_dataset(xray_pixels(), 12), uid.RLELossless)
    with open_image(path) as image:
        text = repr(image.metadata_safe()) + repr(image)
        for value in PATIENT.values():
            assert value not in text
        assert image.metadata_safe()["transfer_syntax"] == uid.RLELossless
        assert image.dicom_dataset().PatientID == PATIENT["PatientID"]


def test_dicom_multiframe_refused(tmp_path: Path) -> None:
    pixels = np.stack([xray_pixels(), xray_pixels()])
    ds = dicom_dataset(pixels[0], 12)
    ds.NumberOfFrames = 2
    ds.PixelData = pixels.tobytes()
    path = write_dicom(tmp_path / "multi.dcm", ds)
    with pytest.raises(InputError, match=r"multi.dcm: multi-frame DICOM \(2 frames\)"):
        open_image(path)


def test_png_16bit_round_trip(tmp_path: Path) -> None:
    pixels = (xray_pixels(bits=16).astype(np.uint32) * 13 % 65536).astype(np.uint16)
    path = tmp_path / "x.png"
    path.write_bytes(imagecodecs.png_encode(pixels))
    with open_image(path) as image:
        assert image.levels == [(48, 40, 1)] and image.dtype == np.uint16
        np.testing.assert_array_equal(_full(image)[..., 0], pixels)


def test_png_rgba_and_16bit_rgb_keep_channels_and_depth(tmp_path: Path) -> None:
    rgb16 = np.random.default_rng(0).integers(0, 65535, (20, 30, 3), dtype=np.uint16)
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(rgb16))
    rgba = np.random.default_rng(1).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    (tmp_path / "rgba.png").write_bytes(imagecodecs.png_encode(rgba))
    with open_image(tmp_path / "rgb16.png") as image:
        np.testing.assert_array_equal(_full(image), rgb16)
    with open_image(tmp_path / "rgba.png") as image:
        np.testing.assert_array_equal(_full(image), rgba)


def test_rgb_jpeg_of_grey_content(tmp_path: Path) -> None:
    grey = xray_pixels(bits=8)
    path = tmp_path / "x.jpg"
    PILImage.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(path, quality=95)
    with open_image(path) as image:
        assert image.levels == [(48, 40, 3)] and image.dtype == np.uint8
        region = image.read_region(0, 10, 5, 20, 30)
    assert region.shape == (20, 30, 3)
    assert np.abs(to_channels(region, 1)[..., 0].astype(int) - grey[10:30, 5:35]).mean() < 2.0


def test_plain_tiff_is_an_xray_with_resolution_mpp(tmp_path: Path) -> None:
    pixels = xray_pixels(bits=16)
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, pixels, resolution=(1e4 / 150, 1e4 / 150), resolutionunit="CENTIMETER")
    with open_image(path) as image:
        assert image.kind == "xray" and image.levels == [(48, 40, 1)]
        assert image.mpp == pytest.approx(150.0)
        np.testing.assert_array_equal(_full(image)[..., 0], pixels)


def test_tiff_placeholder_72_dpi_gives_no_mpp(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, xray_pixels(), resolution=(72, 72), resolutionunit="INCH")
    with open_image(path) as image:
        assert image.mpp is None


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_to_channels(dtype: type) -> None:
    grey = np.arange(12, dtype=dtype).reshape(3, 4, 1)
    rgb = to_channels(grey, 3)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == dtype
    np.testing.assert_array_equal(to_channels(rgb, 1), grey)
    rgba = np.concatenate([rgb, np.full_like(grey, 7)], axis=2)
    np.testing.assert_array_equal(to_channels(rgba, 3), rgb)
    np.testing.assert_array_equal(to_channels(rgba, 1), grey)


def test_to_channels_luminance_weights() -> None:
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 200
    assert to_channels(red, 1)[0, 0, 0] == round(0.299 * 200)


def test_to_channels_refuses_two_channels() -> None:
    with pytest.raises(InputError, match="2 channels"):
        to_channels(np.zeros((2, 2, 2), np.uint8), 3)
