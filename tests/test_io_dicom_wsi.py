"""DICOM whole-slide images through wsidicom: a series of instances read as one image, full
and sparse tiling, with and without Pixel Measures, concatenations, only the frames needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.io import open_image, read_in_place
from pipeline.io.dicom_series import series_files, series_key
from tests.io_fixtures import PATIENT, dicom_dataset, write_dicom, xray_pixels
from tests.slide_fixtures import tissue_rgb, write_dicom_wsi

pytest.importorskip("wsidicom")

LEVEL0 = tissue_rgb(300, 400)


def test_full_tiling_levels_by_pixel_spacing_and_exact_pixels(tmp_path: Path) -> None:
    paths = write_dicom_wsi(tmp_path / "slide", LEVEL0, tile=64, mpp=0.25)
    # any instance of the series opens the whole slide; so does its folder
    for where in (paths[1], tmp_path / "slide"):
        with open_image(where) as image:
            assert image.kind == "slide" and image.metadata_safe()["format"] == "dicom-wsi"
            assert image.levels == [(300, 400, 3), (150, 200, 3), (75, 100, 3)]
            assert image.mpp == pytest.approx(0.25)  # from the Pixel Measures, mm -> µm
            for level in range(3):
                expected = LEVEL0[:: 2**level, :: 2**level]
                np.testing.assert_array_equal(image.read_region(level, 5, 7, 60, 70), expected[5:65, 7:77])
            np.testing.assert_array_equal(read_in_place(image, 1).compute(), LEVEL0[::2, ::2])


def test_sparse_tiling_absent_frames_are_background(tmp_path: Path) -> None:
    def keep(row: int, col: int) -> bool:
        return (row + col) % 2 == 0

    write_dicom_wsi(tmp_path / "slide", LEVEL0, tile=64, sparse=True, keep=keep)
    with open_image(tmp_path / "slide") as image:
        assert image.metadata_safe()["tiling"][0] == "TILED_SPARSE"
        whole = image.read_region(0, 0, 0, 300, 400)
    for row in range(5):
        for col in range(7):
            box = (slice(row * 64, (row + 1) * 64), slice(col * 64, (col + 1) * 64))
            if keep(row, col):
                np.testing.assert_array_equal(whole[box], LEVEL0[box])
            else:
                assert (whole[box] == 255).all()  # glass, not an error


def test_without_pixel_spacing_levels_by_size_and_no_mpp(tmp_path: Path) -> None:
    write_dicom_wsi(tmp_path / "slide", LEVEL0, mpp=None)
    with open_image(tmp_path / "slide") as image:
        assert image.mpp is None
        assert image.levels == [(300, 400, 3), (150, 200, 3), (75, 100, 3)]
        np.testing.assert_array_equal(image.read_region(2, 0, 0, 75, 100), LEVEL0[::4, ::4])


def test_jpeg_frames_decode_close_to_the_source(tmp_path: Path) -> None:
    write_dicom_wsi(tmp_path / "slide", LEVEL0, compression="jpeg")
    with open_image(tmp_path / "slide") as image:
        region = image.read_region(0, 0, 0, 300, 400)
    assert np.abs(region.astype(int) - LEVEL0).mean() < 3


def test_concatenated_instances_written_by_wsidicom_read_the_same(tmp_path: Path) -> None:
    from wsidicom import ConcatenationByFrames, WsiDicom

    write_dicom_wsi(tmp_path / "source", LEVEL0, tile=64)
    with WsiDicom.open(tmp_path / "source") as slide:
        written = slide.save(tmp_path / "concatenated", concatenation=ConcatenationByFrames(8))
    assert len(written) > 3  # level 0's 35 frames in five parts, each its own file
    with open_image(tmp_path / "concatenated") as image:
        assert image.levels[0] == (300, 400, 3)
        np.testing.assert_array_equal(image.read_region(0, 0, 0, 300, 400), LEVEL0)


def test_a_region_reads_only_the_frames_it_touches(tmp_path: Path) -> None:
    write_dicom_wsi(tmp_path / "slide", tissue_rgb(640, 640), tile=64, levels=1)
    with open_image(tmp_path / "slide") as image:
        data = image._instances[0].image_data
        read: list[int] = []
        original = data._get_tile_frame

        def counting(frame_index: int) -> bytes:
            read.append(frame_index)
            return original(frame_index)

        data._get_tile_frame = counting
        image.read_region(0, 64 + 10, 128 + 10, 100, 100)  # rows 1-2, columns 2-3 of 10x10
    assert sorted(read) == [12, 13, 22, 23]


def test_metadata_carries_no_identifier(tmp_path: Path) -> None:
    write_dicom_wsi(tmp_path / "slide", LEVEL0)
    with open_image(tmp_path / "slide") as image:
        text = json.dumps(image.metadata_safe())
    assert not any(value in text for value in PATIENT.values()) and "1.2.826" not in text


def test_discovery_key_groups_a_series_and_leaves_xrays_alone(tmp_path: Path) -> None:
    one = write_dicom_wsi(tmp_path / "both", LEVEL0)
    two = write_dicom_wsi(tmp_path / "other", LEVEL0[:128, :128], levels=1)
    shutil.copy(two[0], tmp_path / "both" / "second-slide.dcm")
    xray = write_dicom(tmp_path / "both" / "chest.dcm", dicom_dataset(xray_pixels(), 12))
    keys = {path.name: series_key(path) for path in sorted((tmp_path / "both").iterdir())}
    assert keys["chest.dcm"] is None
    assert keys["level0.dcm"] == keys["level1.dcm"] == keys["level2.dcm"] != keys["second-slide.dcm"]
    assert series_files(one[2]) == one
    with open_image(xray) as image:  # the X-ray reader, as before
        assert image.kind == "xray"
    with pytest.raises(InputError, match="2 slide series"):
        open_image(tmp_path / "both")
    with open_image(tmp_path / "both" / "second-slide.dcm") as image:
        assert image.levels == [(128, 128, 3)]


def test_slide_guards(tmp_path: Path) -> None:
    write_dicom_wsi(tmp_path / "slide", LEVEL0, tile=64)
    with pytest.raises(InputError, match="exceeds max_slide_pixels=1000") as info:
        open_image(tmp_path / "slide", max_slide_pixels=1000)
    assert str(tmp_path / "slide") in str(info.value)
    with pytest.raises(InputError, match=r"one stored chunk \(64, 64\) exceeds max_pixels=1000"):
        open_image(tmp_path / "slide", max_pixels=1000)


def test_truncated_instance_is_one_line_naming_the_input(tmp_path: Path) -> None:
    paths = write_dicom_wsi(tmp_path / "slide", LEVEL0, tile=64)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError) as info, open_image(paths[0]) as image:
        image.read_region(0, 0, 0, 300, 400)
    message = str(info.value)
    assert message.startswith(str(paths[0])) and "\n" not in message


def test_a_level_with_a_cut_header_refuses_the_series(tmp_path: Path) -> None:
    """wsidicom would skip it and make level 1 the slide: a smaller image, silently."""
    paths = write_dicom_wsi(tmp_path / "slide", LEVEL0, tile=64)
    paths[0].write_bytes(paths[0].read_bytes()[:1000])
    with pytest.raises(InputError, match="1 of the series' 3 instance files are unreadable") as info:
        open_image(paths[1])
    assert str(info.value).startswith(str(paths[1])) and "level0" not in str(info.value)


@pytest.mark.parametrize("sparse", [False, True])
def test_wsidicom_and_openslide_read_the_same_level0(tmp_path: Path, sparse: bool) -> None:
    """Two independent DICOM WSI readers (wsidicom; OpenSlide's libdicom) on JPEG frames:
    identical pixels, absent frames included (OpenSlide's transparent pixels on white)."""
    pytest.importorskip("openslide")
    from pipeline.io import Limits
    from pipeline.io.openslide_image import OpenSlideImage

    paths = write_dicom_wsi(tmp_path / "slide", LEVEL0, tile=128, compression="jpeg", sparse=sparse,
                            keep=(lambda row, col: (row + col) % 3 != 0) if sparse else None)  # fmt: skip
    with open_image(paths[0]) as ours, OpenSlideImage(paths[0], Limits()) as theirs:
        assert theirs.format_name == "openslide-dicom"
        assert ours.levels == theirs.levels and ours.mpp == pytest.approx(theirs.mpp)
        np.testing.assert_array_equal(ours.read_region(0, 0, 0, 300, 400), theirs.read_region(0, 0, 0, 300, 400))


def test_working_level_is_the_level_at_the_models_pixel_size(tmp_path: Path) -> None:
    from pipeline.io.levels import working_level

    write_dicom_wsi(tmp_path / "slide", LEVEL0, mpp=0.25)
    with open_image(tmp_path / "slide") as image:
        chosen = working_level(image, 0.5)  # a model at 0.5 µm/px reads level 1 as stored
        assert (chosen.level, chosen.resample, chosen.hw) == (1, False, (150, 200))
        np.testing.assert_array_equal(read_in_place(image, chosen.level).compute(), LEVEL0[::2, ::2])
