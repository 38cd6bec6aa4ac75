"""DICOM SEG of a slide: a tiled BINARY SEG on the total pixel matrix of one level of a DICOM
WSI (the finest mask level within the bound that is a level of the slide), referencing that
level's instance, empty frames left out; highdicom's segread reads back the mask level,
dciodvfy finds no error. A slide with no DICOM source (SVS, TIFF) gets none, saying why."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline import stages
from pipeline.cards import ModelId
from pipeline.config import RunConfig
from pipeline.io import dicom_seg_slide
from pipeline.io.dicom_seg_slide import fitted, seg_level
from pipeline.io.exports import EXPORTS, ExportInput
from tests.io_fixtures import PATIENT
from tests.slide_fixtures import tissue_rgb, write_aperio, write_dicom_wsi
from tests.test_io_exports import _exported_job

pytest.importorskip("highdicom")
MODEL = ModelId.from_provenance({"card": {"name": "tissue-he", "weights_sha256": "ab" * 32}})


def test_seg_level_is_the_finest_mask_level_within_the_bound_that_is_a_source_level() -> None:
    masks = [(300, 401), (150, 201), (75, 101), (38, 51)]  # the store's pyramid rounds up
    halving = [(300, 401), (150, 200), (75, 100)]  # a scanner that rounds down
    assert seg_level(masks, halving, max_pixels=10**6) == (0, 0)
    assert seg_level(masks, halving, max_pixels=40_000) == (1, 1)  # one pixel off: the same level
    assert seg_level(masks, [(300, 401), (75, 100)], max_pixels=40_000) == (2, 1)  # a pyramid by fours
    assert seg_level(masks, [(300, 401), (148, 200)], max_pixels=40_000) is None  # two off: another size
    assert seg_level(masks, halving, max_pixels=100) is None


def test_fitted_cuts_or_pads_with_background() -> None:
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(fitted(labels, (2, 5)), [[0, 1, 2, 3, 0], [4, 5, 6, 7, 0]])


def test_a_slide_seg_encodes_a_level_of_the_slide_and_readers_open_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import highdicom as hd

    paths = write_dicom_wsi(tmp_path / "slide", tissue_rgb(300, 400), tile=64, mpp=0.25, levels=3)
    mask = np.zeros((300, 400), np.uint8)
    mask[40:170, 70:260] = 1
    mask[200:230, 300:390] = 2
    levels = [mask, mask[::2, ::2], mask[::4, ::4]]
    monkeypatch.setattr(dicom_seg_slide, "SEG_MAX_PIXELS", 150 * 200)  # level 0 is over the bound
    source = ExportInput(mask_levels=levels, classes=("tissue", "tumor"), mpp=0.25, input_path=str(paths[0]),
                         kind="slide", preview=lambda: np.zeros((1, 1, 3)), model=MODEL, input_format="dicom-wsi")  # fmt: skip

    assert EXPORTS["dicom-seg"].applies(source)
    written = EXPORTS["dicom-seg"].write(source, str(tmp_path / "slide.seg.dcm"))

    seg = hd.seg.segread(written)
    level1 = pydicom.dcmread(paths[1], stop_before_pixels=True)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert referenced == level1.SOPInstanceUID  # the level whose spacing the SEG has
    assert (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == (150, 200)
    pixel_spacing = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in pixel_spacing] == pytest.approx([0.0005, 0.0005])  # 0.5 µm: level 1's
    np.testing.assert_array_equal(seg.get_total_pixel_matrix(combine_segments=True), levels[1])
    assert seg.DimensionOrganizationType == "TILED_SPARSE"
    assert seg.NumberOfFrames < 2 * 3 * 4  # per segment, 3 x 4 tiles of 64: empty ones left out
    assert seg.ContentDescription.startswith("1/2 res") and seg.PatientID == PATIENT["PatientID"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tissue", "tumor"]
    check = subprocess.run(["dciodvfy", "-new", written], capture_output=True, text=True)
    assert "Error" not in check.stderr, check.stderr

    monkeypatch.setattr(dicom_seg_slide, "SEG_MAX_PIXELS", 30 * 30)  # no level fits: one line saying so
    with pytest.raises(Exception, match="no mask level of at most 900 pixels has the size of a level of the source"):
        EXPORTS["dicom-seg"].write(source, str(tmp_path / "none.seg.dcm"))


def test_a_slide_without_a_dicom_source_gets_no_seg_and_the_reason(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    svs = write_aperio(tmp_path / "slide.svs", tissue_rgb(64, 64), compression="none", tile=16, levels=1)
    job = replace(_exported_job(tmp_path, svs, np.zeros((64, 64), np.uint8)), kind="slide")

    with caplog.at_level(logging.WARNING, logger="pipeline.stages"):
        assert stages.export(job, RunConfig(), ("dicom-seg",)) == {}
    [line] = [r.getMessage() for r in caplog.records if "dicom-seg" in r.getMessage()]
    assert line == ("img: dicom-seg needs a DICOM source image to reference (a DICOM X-ray or DICOM WSI series; "
                    "an SVS, TIFF or other slide has none); skipped")  # fmt: skip
