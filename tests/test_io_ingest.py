"""Resampling and ingest into zarr work arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image as PILImage

from pipeline.errors import InputError
from pipeline.io import ingest, open_image, resize
from pipeline.io.resample import resize_region


def _noise(height: int, width: int, channels: int, dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(height * width)
    return rng.integers(0, 255, (height, width, channels)).astype(dtype)


def test_resize_is_torch_antialiased_bilinear() -> None:
    pixels = _noise(40, 50, 3)
    tensor = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(
        tensor, size=(13, 17), mode="bilinear", antialias=True, align_corners=False
    )[0].permute(1, 2, 0)
    out = resize(pixels, (13, 17))
    assert out.dtype == np.float32 and out.shape == (13, 17, 3)
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=1e-4)


def test_resize_same_shape_is_a_float_copy() -> None:
    pixels = _noise(5, 6, 1)
    out = resize(pixels, (5, 6))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize(
    ("src", "dst"), [((97, 131), (31, 40)), ((60, 50), (143, 101)), ((300, 200), (150, 100))]
)
def test_resize_region_equals_crop_of_whole_resize(
    src: tuple[int, int], dst: tuple[int, int]
) -> None:
    pixels = _noise(*src, 2).astype(np.float32)
    whole = resize(pixels, dst)

    def read(y: int, x: int, h: int, w: int) -> np.ndarray:
        assert y >= 0 and x >= 0 and y + h <= src[0] and x + w <= src[1]
        return pixels[y : y + h, x : x + w]

    rows, cols = (dst[0] // 3, dst[0] // 3 + 7), (5, dst[1] - 2)
    part = resize_region(read, src, dst, rows, cols)
    np.testing.assert_allclose(part, whole[slice(*rows), slice(*cols)], rtol=0, atol=2e-3)


def test_ingest_copies_a_level_with_aligned_chunks_and_source_dtype(tmp_path: Path) -> None:
    pixels = _noise(300, 250, 1, np.uint16)
    tifffile.imwrite(tmp_path / "x.tif", pixels[..., 0])
    with open_image(tmp_path / "x.tif") as image:
        work = ingest(image, 0, tmp_path / "work.zarr", chunk=128)
    assert work.shape == (300, 250, 1) and work.chunks == (128, 128, 1) and work.dtype == np.uint16
    assert work.shards is None
    reopened = zarr.open_array(tmp_path / "work.zarr", mode="r")
    np.testing.assert_array_equal(reopened[:], pixels)
    assert reopened.attrs["source_level"] == 0


def test_ingest_of_a_slide_level(tmp_path: Path) -> None:
    pixels = _noise(260, 300, 3)
    tifffile.imwrite(
        tmp_path / "s.tif", pixels, tile=(64, 64), compression="zlib", photometric="rgb"
    )
    with open_image(tmp_path / "s.tif") as image:
        work = ingest(image, 0, str(tmp_path / "work.zarr"), chunk=96)
    assert work.chunks == (96, 96, 3)
    np.testing.assert_array_equal(work[:], pixels)


def test_bandwise_resampled_ingest_equals_whole_image_resize(tmp_path: Path) -> None:
    pixels = _noise(257, 190, 3)
    PILImage.fromarray(pixels).save(tmp_path / "x.png")
    with open_image(tmp_path / "x.png") as image:
        work = ingest(image, 0, tmp_path / "work.zarr", work_shape=(100, 77), chunk=32)
    assert work.dtype == np.float32 and work.shape == (100, 77, 3) and work.chunks == (32, 32, 3)
    np.testing.assert_allclose(work[:], resize(pixels, (100, 77)), rtol=0, atol=2e-3)


def test_ingest_upsampling(tmp_path: Path) -> None:
    pixels = _noise(40, 30, 1)
    PILImage.fromarray(pixels[..., 0]).save(tmp_path / "x.png")
    with open_image(tmp_path / "x.png") as image:
        work = ingest(image, 0, tmp_path / "work.zarr", work_shape=(90, 70), chunk=32)
    np.testing.assert_allclose(work[:], resize(pixels, (90, 70)), rtol=0, atol=2e-3)


def test_ingest_rejects_bad_level(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    with open_image(tmp_path / "x.png") as image, pytest.raises(InputError, match="level 2 not in"):
        ingest(image, 2, tmp_path / "work.zarr")


@pytest.mark.parametrize("work_shape", [None, (120, 100)])
def test_ingest_reads_the_source_chunk_by_chunk(tmp_path: Path, work_shape) -> None:
    pixels = _noise(300, 250, 1)
    PILImage.fromarray(pixels[..., 0]).save(tmp_path / "x.png")
    areas: list[int] = []
    with open_image(tmp_path / "x.png") as image:
        read_region = image.read_region

        def recording(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
            areas.append(h * w)
            return read_region(level, y, x, h, w)

        image.read_region = recording
        ingest(image, 0, tmp_path / "work.zarr", work_shape=work_shape, chunk=32)
    # a copied chunk reads 32^2; a resampled one 32 * 2.5 plus the filter's reach each way
    assert max(areas) <= (32 * 2.5 + 2 * 3) ** 2
    assert len(areas) >= (300 * 250 if work_shape is None else 120 * 100) // 32**2
