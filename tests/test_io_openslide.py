"""OpenSlide's formats behind the same Image interface, the reader chosen by content, and
exactness across readers: one slide through tifffile and OpenSlide gives the same level-0
pixels and the same masks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pipeline.errors import InputError
from pipeline.io import Limits, open_image, read_in_place
from pipeline.io.sniff import sniff
from pipeline.io.tiff import TiffImage
from tests.slide_fixtures import (
    tissue_rgb,
    write_aperio,
    write_leica_scn,
    write_ndpi_like,
    write_philips_like,
)

openslide = pytest.importorskip("openslide")
from pipeline.io.openslide_image import OpenSlideImage, _flatten  # noqa: E402

REAL_SVS = "wsi-tcga-cr-7395/tcga-cr-7395-01a-01-ts1.svs"  # Aperio, JPEG 2000 (33005) tiles
LEVEL0 = tissue_rgb(600, 760)


@pytest.mark.parametrize("compression", ["none", "jpeg", "jpeg2000"])
def test_aperio_through_openslide_levels_mpp_and_level0_pixels_equal_tifffile(
    tmp_path: Path, compression: str
) -> None:
    path = write_aperio(tmp_path / "slide.svs", LEVEL0, mpp=0.2527, compression=compression)
    assert sniff(path) == "tiff"  # both read it; tifffile is the faster, so it is chosen
    with OpenSlideImage(path, Limits()) as slide, open_image(path) as tiff:
        assert slide.format_name == "openslide-aperio" and slide.kind == "slide"
        assert slide.levels == tiff.levels == [(600, 760, 3), (300, 380, 3)]
        assert slide.mpp == tiff.mpp == pytest.approx(0.2527)
        np.testing.assert_array_equal(slide.read_region(0, 0, 0, 600, 760), tiff.read_region(0, 0, 0, 600, 760))
        np.testing.assert_array_equal(slide.read_region(0, 37, 301, 256, 300), tiff.read_region(0, 37, 301, 256, 300))
        # a level of a whole downsample (2x) is read exactly too
        np.testing.assert_array_equal(slide.read_region(1, 10, 20, 100, 120), tiff.read_region(1, 10, 20, 100, 120))
        np.testing.assert_array_equal(read_in_place(slide, 1).compute(), tiff.read_region(1, 0, 0, 300, 380))
    if compression != "jpeg":
        with OpenSlideImage(path, Limits()) as slide:
            np.testing.assert_array_equal(slide.read_region(0, 0, 0, 600, 760), LEVEL0)


def test_real_svs_level0_identical_through_tifffile_and_openslide(real_data: Path) -> None:
    path = real_data / REAL_SVS
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with OpenSlideImage(path, Limits()) as slide, open_image(path) as tiff:
        assert slide.levels == tiff.levels
        height, width, _ = tiff.levels[0]
        for y in range(0, height, 1024):  # in bands: two whole copies would be 95 MB
            rows = min(1024, height - y)
            np.testing.assert_array_equal(slide.read_region(0, y, 0, rows, width), tiff.read_region(0, y, 0, rows, width))


@pytest.mark.slow  # two segmentations of the real slide (~20 s each on 2 cores)
def test_real_svs_masks_identical_through_tifffile_and_openslide(
    real_data: Path, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import io, segment
    from pipeline.store import OutputStore

    path = real_data / REAL_SVS
    if not path.is_file():
        pytest.skip(f"{path} not found")
    settings = {"tile": 512, "exports": ()}
    by_tifffile = OutputStore.open(segment(path, tiny_checkpoint, tmp_path / "tifffile", **settings))
    # the same run with every TIFF opened by OpenSlide, workers' in-place reads included
    monkeypatch.setitem(io.READERS, "tiff", lambda p, fmt, limits: OpenSlideImage(p, limits))
    by_openslide = OutputStore.open(segment(path, tiny_checkpoint, tmp_path / "openslide", **settings))
    assert by_openslide.provenance["input"]["image"]["format"] == "openslide-aperio"
    assert by_tifffile.summary()["counts"] == by_openslide.summary()["counts"]
    prob = by_tifffile.read_prob()
    assert prob.std() > 0  # the (untrained) model's output follows the pixels
    np.testing.assert_array_equal(prob, by_openslide.read_prob())
    np.testing.assert_array_equal(by_tifffile.mask[...], by_openslide.mask[...])


def test_generic_tiled_tiff_reads_the_same_through_openslide(tmp_path: Path) -> None:
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, LEVEL0, tile=(128, 128), photometric="rgb", compression="zlib")
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff" and sniff(path) == "tiff"
    with OpenSlideImage(path, Limits()) as slide:
        assert slide.mpp is None and slide.levels == [(600, 760, 3)]
        np.testing.assert_array_equal(read_in_place(slide, 0).compute(), LEVEL0)


def test_ndpi_reads_the_same_through_openslide_and_tifffile(tmp_path: Path) -> None:
    """OpenSlide is chosen (faster); tifffile, the reader without OpenSlide, gives the same
    pixels, decoding the level's single JPEG restart interval by restart interval."""
    level0 = tissue_rgb(600, 800)  # cropped to 576x768: whole restart intervals per MCU row
    path = write_ndpi_like(tmp_path / "slide.tif", level0, mpp=0.226)
    assert openslide.OpenSlide.detect_format(str(path)) == "hamamatsu" and sniff(path) == "openslide"
    with TiffImage(path, Limits()) as tiff, open_image(path) as slide:
        assert slide.metadata_safe()["format"] == "openslide-hamamatsu"
        meta = tiff.metadata_safe()
        assert meta["format"] == "ndpi" and meta["tile"] == [8, 96]  # a tile per restart interval
        assert tiff.levels == [(576, 768, 3), (288, 384, 3), (144, 192, 3)]
        assert slide.levels[:3] == tiff.levels  # OpenSlide adds levels decoded at 1/2..1/8
        assert tiff.mpp == slide.mpp == pytest.approx(0.226)  # pixels per cm in the resolution tags
        np.testing.assert_array_equal(tiff.read_region(0, 0, 0, 576, 768), slide.read_region(0, 0, 0, 576, 768))
        np.testing.assert_array_equal(tiff.read_region(1, 10, 30, 200, 300), slide.read_region(1, 10, 30, 200, 300))
        assert np.abs(tiff.read_region(0, 0, 0, 576, 768).astype(int) - level0[:576, :768]).mean() < 3


def test_philips_tiff_reads_the_same_through_tifffile_and_openslide(tmp_path: Path) -> None:
    level0 = tissue_rgb(512, 768)  # levels 1, 2 stored padded to whole 256² tiles
    path = write_philips_like(tmp_path / "slide.tiff", level0, mpp=0.2425)
    assert openslide.OpenSlide.detect_format(str(path)) == "philips" and sniff(path) == "tiff"
    with open_image(path) as tiff, OpenSlideImage(path, Limits()) as slide:
        assert tiff.metadata_safe()["format"] == "philips-tiff"
        assert tiff.levels == slide.levels == [(512, 768, 3), (256, 384, 3), (128, 192, 3)]
        assert tiff.mpp == slide.mpp == pytest.approx(0.2425)  # the XML's DICOM_PIXEL_SPACING
        for level, (height, width, _) in enumerate(tiff.levels):
            np.testing.assert_array_equal(tiff.read_region(level, 0, 0, height, width), level0[:: 2**level, :: 2**level])
            np.testing.assert_array_equal(slide.read_region(level, 0, 0, height, width), level0[:: 2**level, :: 2**level])


def test_leica_scn_goes_to_openslide_which_places_its_image_on_the_glass(tmp_path: Path) -> None:
    """tifffile's SCN series would be the main image alone; OpenSlide composes the
    collection (what Leica's viewer, QuPath and TIAToolbox show): the image at its offset,
    unscanned glass around it (transparent, read as the white background)."""
    level0 = tissue_rgb(512, 640)
    path = write_leica_scn(tmp_path / "slide.scn", level0, mpp=0.5, margin=96)
    assert sniff(path) == "openslide"
    with open_image(path) as image:
        assert image.metadata_safe()["format"] == "openslide-leica"
        assert image.levels == [(704, 832, 3), (352, 416, 3)] and image.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(image.read_region(0, 96, 96, 512, 640), level0)
        np.testing.assert_array_equal(image.read_region(1, 48, 48, 256, 320), level0[::2, ::2])
        assert (image.read_region(0, 0, 0, 96, 832) == 255).all()


def test_formats_only_openslide_reads_are_sniffed_as_openslide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sniffing = sys.modules["pipeline.io.sniff"]  # the module, not the function of that name
    path = write_aperio(tmp_path / "slide.bif", LEVEL0, compression="none")
    for vendor in ("ventana", "trestle"):  # their TIFFs' tiles overlap
        monkeypatch.setattr(sniffing, "openslide_vendor", lambda p, v=vendor: v)
        assert sniff(path) == "openslide"
    monkeypatch.setattr(sniffing, "openslide_vendor", lambda p: "mirax")
    (tmp_path / "slide.mrxs").write_text("[GENERAL]\n")  # an index, not a TIFF: by OpenSlide alone
    assert sniff(tmp_path / "slide.mrxs") == "openslide"


def test_openslide_guards_are_one_line_naming_the_file(tmp_path: Path) -> None:
    path = write_aperio(tmp_path / "slide.svs", LEVEL0, compression="jpeg")
    with pytest.raises(InputError, match="exceeds max_slide_pixels=1000"):
        OpenSlideImage(path, Limits(max_slide_pixels=1000))
    with pytest.raises(InputError, match=r"one stored chunk \(256, 256\) exceeds max_pixels=1000"):
        OpenSlideImage(path, Limits(max_pixels=1000))
    with OpenSlideImage(path, Limits(max_pixels=300 * 300)) as slide, pytest.raises(InputError, match="exceeds max_pixels"):
        slide.read_region(0, 0, 0, 400, 400)
    data = path.read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 3])
    with pytest.raises(InputError) as info, OpenSlideImage(tmp_path / "cut.svs", Limits()) as slide:
        slide.read_region(0, 0, 0, 600, 760)
    assert str(info.value).startswith(str(tmp_path / "cut.svs")) and "\n" not in str(info.value)
    (tmp_path / "notes.mrxs").write_text("not a slide")
    with pytest.raises(InputError, match="notes.mrxs: unreadable by OpenSlide"):
        OpenSlideImage(tmp_path / "notes.mrxs", Limits())


def test_transparent_pixels_become_the_background_colour() -> None:
    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [200, 100, 50, 128]]], np.uint8)
    flat = _flatten(rgba, (255, 255, 255))
    assert flat.tolist() == [[[10, 20, 30], [255, 255, 255], [227, 177, 152]]]
    assert _flatten(rgba[:, :1], (0, 0, 0)).tolist() == [[[10, 20, 30]]]  # opaque: as stored
