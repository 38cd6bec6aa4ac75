"""Mask exports: pyramidal OME-TIFF, PNG labels, overlay, DICOM SEG."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image as PILImage

from pipeline import stages
from pipeline.config import RunConfig
from pipeline.display import PALETTE
from pipeline.errors import ConfigError, InputError
from pipeline.io import open_image
from pipeline.io.exports import (
    EXPORT_TILE,
    EXPORTS,
    export_ome_tiff,
    export_overlay,
    export_png,
)
from pipeline.job import ImageJob
from pipeline.store import OutputStore
from tests.io_fixtures import ReadRecorder, dicom_dataset, write_dicom, xray_pixels


def _mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 8 : height // 2, width // 8 : width // 2] = 1
    mask[height // 2 :, width // 2 :] = 2
    return mask


def test_ome_tiff_export_is_a_pyramid_with_mpp(tmp_path: Path) -> None:
    full = _mask(1300, 1100)
    levels = [full, full[::2, ::2], full[::4, ::4]]
    stored = [
        zarr.create_array(tmp_path / f"{i}.zarr", data=a, chunks=(256, 256))
        for i, a in enumerate(levels)
    ]
    path = export_ome_tiff(stored, tmp_path / "mask.ome.tif", mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [a.shape for a in levels]
        assert series.keyframe.tilewidth == EXPORT_TILE
        for level, expected in zip(series.levels, levels, strict=True):
            np.testing.assert_array_equal(level.asarray(), expected)
    with open_image(path) as image:  # our reader agrees: a slide pyramid at 0.5 µm
        assert image.mpp == pytest.approx(0.5)
        assert [shape[:2] for shape in image.levels] == [a.shape for a in levels]


def test_ome_tiff_export_reads_tile_by_tile(tmp_path: Path) -> None:
    level = ReadRecorder(_mask(1200, 1500))
    export_ome_tiff([level], tmp_path / "mask.ome.tif", mpp=None)
    assert len(level.reads) == 3 * 3 and max(level.reads) <= EXPORT_TILE**2
    with tifffile.TiffFile(tmp_path / "mask.ome.tif") as tif:
        np.testing.assert_array_equal(tif.asarray(), level.data)


def test_png_export_keeps_raw_labels(tmp_path: Path) -> None:
    mask = _mask(60, 80)
    path = export_png(mask, tmp_path / "mask.png")
    np.testing.assert_array_equal(np.asarray(PILImage.open(path)), mask)


def test_png_export_refuses_slide_sized_masks(tmp_path: Path) -> None:
    class Huge:
        shape = (100_000, 100_000)

    with pytest.raises(ConfigError, match="exceeds"):
        export_png(Huge(), tmp_path / "mask.png")


def test_overlay_is_bounded_tinted_and_outlined(tmp_path: Path) -> None:
    image = (np.arange(3000)[:, None] * 20 + np.zeros(1500)).astype(np.uint16)  # 16-bit grey
    mask = _mask(750, 375)  # a quarter-resolution mask
    path = export_overlay(image, mask, tmp_path / "overlay.png", max_size=600)
    overlay = np.asarray(PILImage.open(path))
    assert overlay.shape == (600, 300, 3)
    assert tuple(overlay[-1, -1]) == tuple(PALETTE[1])  # class 2's outline at the border
    inside = overlay[450, 225].astype(int)
    assert inside[1] > inside[0] and inside[1] > inside[2]  # green tint of class 2
    background = overlay[5, 200]
    assert background[0] == background[1] == background[2]


# ---------------------------------------------------------------------------------------
# the registry, as stages.export uses it


def _exported_job(tmp_path: Path, input_path: Path, mask: np.ndarray) -> ImageJob:
    """A store beside ``input_path`` holding ``mask`` and a preview, and its job."""
    hw = mask.shape
    store = OutputStore.create_or_open(
        tmp_path / "out" / "img.zarr", image_id="img", full_hw=hw, work_hw=hw, tile=16,
        full_chunk=16, classes=["lung", "heart"],
        provenance={"input": {"sha256": "ab" * 32}, "model": {"sha256": "cd" * 32}, "run": {}},
    )  # fmt: skip
    store.mask[...] = mask
    store.write_preview(np.full((*hw, 1), 90, np.uint8))
    return ImageJob(image_id="img", input_path=str(input_path), store_path=store.path,
                    full_hw=hw, work_hw=hw, tile=16, halo=0, kind="xray")  # fmt: skip


def test_export_writes_each_format_by_the_registry(tmp_path: Path, caplog) -> None:
    source = tmp_path / "x.png"
    PILImage.fromarray(xray_pixels(bits=8)).save(source)
    job = _exported_job(tmp_path, source, _mask(48, 40))
    with caplog.at_level(logging.INFO, logger="pipeline.stages"):
        written = stages.export(job, RunConfig(), tuple(EXPORTS))
    base = tmp_path / "out" / "img"
    assert written == {
        "overlay": f"{base}.overlay.png", "png": f"{base}.mask.png",
        "ome-tiff": f"{base}.mask.ome.tif", "tiff": f"{base}.mask.tif", "geojson": f"{base}.geojson",
    }  # fmt: skip
    assert "img: dicom-seg needs a DICOM source image to reference (a DICOM X-ray or DICOM WSI series" in caplog.text
    np.testing.assert_array_equal(np.asarray(PILImage.open(written["png"])), _mask(48, 40))
    assert np.asarray(PILImage.open(written["overlay"])).shape == (48, 40, 3)
    np.testing.assert_array_equal(tifffile.imread(written["ome-tiff"]), _mask(48, 40))
    np.testing.assert_array_equal(tifffile.imread(written["tiff"]), _mask(48, 40))
    features = json.loads(Path(written["geojson"]).read_text())["features"]
    assert sorted(f["properties"]["classification"]["name"] for f in features) == ["heart", "lung"]
    assert stages.export(job, RunConfig(exports=("png",))) == {"png": f"{base}.mask.png"}
    with pytest.raises(InputError, match="unknown export 'jpeg'"):
        stages.export(job, RunConfig(), ("jpeg",))


def test_export_writes_dicom_seg_for_a_dicom_xray(tmp_path: Path) -> None:
    source = write_dicom(tmp_path / "x.dcm", dicom_dataset(xray_pixels(), 12))
    job = _exported_job(tmp_path, source, _mask(48, 40))
    written = stages.export(job, RunConfig(), ("dicom-seg",))
    assert written == {"dicom-seg": str(tmp_path / "out" / "img.seg.dcm")}
    seg = hd.seg.segread(written["dicom-seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "heart"]
    assert "cdcdcdcdcdcd" in seg.SeriesDescription  # the model, from the store's provenance
    slide = dataclasses.replace(job, kind="slide")  # a DICOM slide has no X-ray to reference
    assert stages.export(slide, RunConfig(), ("dicom-seg",)) == {}
