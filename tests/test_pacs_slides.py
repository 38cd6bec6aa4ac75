"""A hospital's slide archive in a PACS, against a real Orthanc with its DICOMweb plugin
(tests/orthanc.py): a VL Whole Slide Microscopy series found by the query is one image,
read frame by frame through wsidicom's DICOMweb source (only the frames a read touches;
levels the run does not need never fetched), segmented like the same series read from
files, its tiled DICOM SEG sent back with STOW-RS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from flows import pacs
from flows.cli import app
from pipeline.config import RunConfig
from pipeline.io import open_image
from tests.io_fixtures import PATIENT
from tests.orthanc import Orthanc
from tests.slide_fixtures import tissue_rgb, write_dicom_wsi

pytest.importorskip("wsidicom")

runner = CliRunner()
# Level 0 is 4 µm/px and longer than the store's picture (8192): tissue-he (8 µm/px) works
# on level 1, the picture starts at level 1 and the preview reads level 2, so a run needs
# no pixel of level 0. Its sides are whole tiles, so every frame is distinct.
LEVEL0 = tissue_rgb(512, 8448)
TILE = 256


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(SOP Instance UID, frame number) of every frame fetched through wsidicom's client."""
    from wsidicom.web import WsiDicomWebClient

    frames: list[tuple[str, int]] = []
    original = WsiDicomWebClient.get_frames

    def counting(self: Any, study: str, series: str, instance: str, numbers: list[int], syntax: str) -> Any:
        frames.extend((str(instance), n) for n in numbers)
        return original(self, study, series, instance, numbers, syntax)

    monkeypatch.setattr(WsiDicomWebClient, "get_frames", counting)
    return frames


def upload_slide(orthanc: Orthanc, folder: Path, compression: str = "none") -> list[pydicom.Dataset]:
    paths = write_dicom_wsi(folder, LEVEL0, tile=TILE, mpp=4.0, levels=3, compression=compression)
    datasets = [pydicom.dcmread(p) for p in paths]
    orthanc.upload(*datasets)
    return datasets


@pytest.mark.parametrize("compression", ["none", "jpeg"])
def test_a_slide_series_is_one_image_read_frame_by_frame(orthanc: Orthanc, tmp_path: Path, compression: str,
                                                         fetched: list[tuple[str, int]]) -> None:  # fmt: skip
    """Uncompressed and JPEG frames alike: the frames the PACS holds, not transcoded (the
    same pixels as the files decoded here)."""
    levels = upload_slide(orthanc, tmp_path / "slide", compression)
    out = str(tmp_path / "out")

    found = pacs.query(orthanc.source, out, ("Modality in [SM]",), RunConfig(watermark=False))

    [source] = found.sources  # three instances, one image: the series
    assert source.uri.endswith(f"/series/{levels[0].SeriesInstanceUID}") and source.header == {"Modality": ("SM",)}
    assert levels[0].SeriesInstanceUID not in source.image_id
    with open_image(source.uri) as web, open_image(tmp_path / "slide") as files:
        assert web.levels == files.levels and web.mpp == files.mpp == pytest.approx(4.0)
        assert web.metadata_safe() == {**files.metadata_safe(), "source": "dicomweb"}
        assert web.metadata_safe()["modality"] == "SM"  # what the card's modality check reads
        assert not fetched  # opening reads metadata only
        region = web.read_region(1, 10, TILE + 10, 200, TILE)  # columns 1-2 of level 1's row 0
        np.testing.assert_array_equal(region, files.read_region(1, 10, TILE + 10, 200, TILE))
    assert sorted(fetched) == [(levels[1].SOPInstanceUID, 2), (levels[1].SOPInstanceUID, 3)]


@pytest.mark.slow  # two runs of a slide, one through the PACS
def test_a_slide_from_the_pacs_segments_like_its_files_and_its_seg_goes_back(
    flows_env: None, orthanc: Orthanc, tmp_path: Path, fetched: list[tuple[str, int]]
) -> None:
    import highdicom as hd

    from pipeline.store import OutputStore

    levels = upload_slide(orthanc, tmp_path / "slide")
    common = ("-m", "tissue-he", "--tile", str(TILE), "--export", "dicom-seg,overlay", "--json")

    web = runner.invoke(app, ["run", orthanc.source, "-o", str(tmp_path / "web"), "--store", "dicomweb", *common])
    assert web.exit_code == 0, web.output
    files = runner.invoke(app, ["run", str(tmp_path / "slide"), "-o", str(tmp_path / "files"), *common])
    assert files.exit_code == 0, files.output

    [from_pacs], [from_files] = json.loads(web.stdout), json.loads(files.stdout)
    assert from_pacs["state"] == "complete" and from_pacs["stored"] == "sent"
    assert from_pacs["counts"]["skipped"] > 0 and from_pacs["counts"]["done"] > 0  # glass skipped
    mask = OutputStore.open(from_pacs["output"]).mask
    assert mask.shape == LEVEL0.shape[:2]  # at full resolution
    np.testing.assert_array_equal(mask[...], OutputStore.open(from_files["output"]).mask[...])
    assert not (tmp_path / "web" / ".inputs").exists()  # nothing fetched whole
    by_instance = {level.SOPInstanceUID: i for i, level in enumerate(levels)}
    assert {by_instance[uid] for uid, _ in fetched} == {1, 2}  # level 0: not one frame
    assert len(fetched) == len(set(fetched))  # each frame fetched once

    # the SEG: at full resolution (level 0 is within the bound), referencing level 0's
    # instance, in the PACS, read by highdicom, valid to dciodvfy
    [seg_series] = orthanc.series(levels[0].StudyInstanceUID, Modality="SEG")
    [seg] = orthanc.client().retrieve_series(levels[0].StudyInstanceUID, seg_series["0020000E"]["Value"][0])
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert referenced == levels[0].SOPInstanceUID and seg.PatientID == PATIENT["PatientID"]
    np.testing.assert_array_equal(segmentation.get_total_pixel_matrix(combine_segments=True), mask[...])
    local = next((tmp_path / "web").glob("*.seg.dcm"))
    assert "Error" not in subprocess.run(["dciodvfy", "-new", str(local)], capture_output=True, text=True).stderr


def test_a_pacs_gone_mid_slide_is_one_line_naming_the_service_root(orthanc: Orthanc, tmp_path: Path) -> None:
    """An OSError (the ingest task retries it), never a decoding error of the image, and
    no UID in it (the request URL's path holds them)."""
    levels = upload_slide(orthanc, tmp_path / "slide")
    [source] = pacs.query(orthanc.source, str(tmp_path / "out"), ("Modality in [SM]",), RunConfig()).sources
    with open_image(source.uri) as web:
        orthanc.stop()
        with pytest.raises(OSError) as caught:
            web.read_region(2, 0, 0, 100, 100)
    assert str(caught.value) == f"{orthanc.url}: WADO-RS frames: cannot reach the PACS (Connection refused)"
    assert levels[2].SOPInstanceUID not in str(caught.value)
