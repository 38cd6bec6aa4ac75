"""DICOM SEG against the readers radiology engineers use: highdicom's segread, dcmqi's
segimage2itkimage (3D Slicer's converter) and dicom3tools' dciodvfy, on projection
radiographs with and without (valid) pixel spacing, MONOCHROME1 and 2, one and three
classes; and once end to end through the CLI."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import uid

from pipeline.cards import ModelId
from pipeline.display import class_colour
from pipeline.errors import ConfigError
from pipeline.io.dicom_geometry import NOMINAL_MM, OwnFrame, own_frame
from pipeline.io.dicom_seg import export_dicom_seg
from tests.io_fixtures import PATIENT, dicom_dataset, write_dicom, xray_pixels

MODEL = ModelId(name="lung-xray", version="0285f3c1db69")
HW = (64, 48)

# name -> dicom_dataset attributes (the fixture writes a DX with a Frame of Reference UID and
# no patient position); None values are deleted
SOURCES: dict[str, dict[str, Any]] = {
    "CR PixelSpacing MONOCHROME1": {
        "SOPClassUID": uid.ComputedRadiographyImageStorage, "Modality": "CR",
        "PixelSpacing": [0.139, 0.143], "PatientOrientation": ["L", "F"],
        "FrameOfReferenceUID": None, "photometric": "MONOCHROME1",
    },
    "DX ImagerPixelSpacing only": {"ImagerPixelSpacing": [0.15, 0.15]},
    "DX without spacing": {},
    "CR PixelSpacing [0, 0] (as RG1_UNCR)": {
        "SOPClassUID": uid.ComputedRadiographyImageStorage, "Modality": "CR",
        "PixelSpacing": [0, 0], "FrameOfReferenceUID": None, "photometric": "MONOCHROME1",
    },
    "DX [0, 0] with ImagerPixelSpacing": {"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.2, 0.1]},
    "slice with patient coordinates": {
        "PixelSpacing": [0.7, 0.7], "SliceThickness": 2.5, "ImagePositionPatient": [-100, -90, 30],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
    },
}  # fmt: skip
EXPECTED_SPACING = {  # what the SEG's Pixel Measures say
    "CR PixelSpacing MONOCHROME1": (0.139, 0.143),
    "DX ImagerPixelSpacing only": (0.15, 0.15),
    "DX without spacing": (NOMINAL_MM, NOMINAL_MM),
    "CR PixelSpacing [0, 0] (as RG1_UNCR)": (NOMINAL_MM, NOMINAL_MM),
    "DX [0, 0] with ImagerPixelSpacing": (0.2, 0.1),
    "slice with patient coordinates": (0.7, 0.7),
}


def _mask(classes: int, absent: tuple[int, ...] = ()) -> np.ndarray:
    """(HW) labels 0..classes, each class a block of its own (those in ``absent`` left out)."""
    mask = np.zeros(HW, np.uint8)
    height, width = HW
    for k in range(1, classes + 1):
        if k not in absent:
            mask[(k - 1) * height // classes + 2 : k * height // classes - 2, k : width - 2 * k] = k
    return mask


MASKS = {
    "1 class": (("lung",), _mask(1)),
    "3 classes": (("lung", "heart", "tumour"), _mask(3)),
    "3 classes, one absent": (("lung", "heart", "tumour"), _mask(3, absent=(2,))),
}


def _source(tmp_path: Path, name: str) -> Path:
    attributes = dict(SOURCES[name])
    photometric = attributes.pop("photometric", "MONOCHROME2")
    ds = dicom_dataset(xray_pixels(*HW, bits=12), 12, photometric)
    for key, value in attributes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_dicom(tmp_path / "source.dcm", ds)


@pytest.fixture(params=list(SOURCES))
def source(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    """(name, path) of each source."""
    return request.param, _source(tmp_path, request.param)


@pytest.fixture(params=list(MASKS))
def exported(request: pytest.FixtureRequest, source: tuple[str, Path], tmp_path: Path) -> Exported:
    """Each source's SEG of each mask."""
    name, path = source
    classes, mask = MASKS[request.param]
    seg = export_dicom_seg(path, mask, classes, tmp_path / "x.seg.dcm", MODEL)
    return Exported(name, path, Path(seg), classes, mask)


@dataclass(frozen=True)
class Exported:
    source_name: str
    source: Path
    seg: Path
    classes: tuple[str, ...]
    mask: np.ndarray


# -- highdicom ------------------------------------------------------------------------------------


def test_segread_gives_back_each_segment(exported: Exported) -> None:
    source = pydicom.dcmread(exported.source)
    seg = hd.seg.segread(exported.seg)

    n = len(exported.classes)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=list(range(1, n + 1))
    )
    assert pixels.shape == (1, *HW, n)  # one segment per class, present or not
    for k in range(1, n + 1):
        np.testing.assert_array_equal(pixels[0, ..., k - 1], exported.mask == k)
    for item, name in zip(seg.SegmentSequence, exported.classes, strict=True):
        assert item.SegmentLabel == name
        colour = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue)
        assert np.allclose(colour.to_rgb(), class_colour(item.SegmentNumber), atol=1)
        [algorithm] = item.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)


def test_seg_describes_and_references_its_source(exported: Exported) -> None:
    source = pydicom.dcmread(exported.source)
    seg = pydicom.dcmread(exported.seg)

    assert MODEL.name in seg.SeriesDescription and MODEL.version in seg.SeriesDescription
    assert seg.ContentCreatorName.family_name == "segpipe"
    for key, value in PATIENT.items():  # the one output that carries them, copied from the source
        assert str(seg.get(key)) == value
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    [series] = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        [derivation] = frame.DerivationImageSequence
        [reference] = derivation.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.SpatialLocationsPreserved == "YES"


def test_seg_geometry_never_copies_an_invalid_spacing(source: tuple[str, Path], tmp_path: Path) -> None:
    name, path = source
    original = pydicom.dcmread(path)
    seg = pydicom.dcmread(export_dicom_seg(path, _mask(1), ["lung"], tmp_path / "x.seg.dcm", MODEL))
    shared = seg.SharedFunctionalGroupsSequence[0]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx(EXPECTED_SPACING[name])
    if "ImagePositionPatient" in original:  # its own coordinates, as they are
        assert seg.FrameOfReferenceUID == original.FrameOfReferenceUID
        position = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == [-100, -90, 30]
    else:  # a frame of its own, shared with nothing
        assert seg.FrameOfReferenceUID != original.get("FrameOfReferenceUID")
        orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        assert [float(v) for v in orientation] == [1, 0, 0, 0, 1, 0]


def test_a_source_without_spacing_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _source(tmp_path, "CR PixelSpacing [0, 0] (as RG1_UNCR)")
    with caplog.at_level("WARNING", logger="pipeline.io.dicom_seg"):
        export_dicom_seg(path, _mask(1), ["lung"], tmp_path / "img.seg.dcm", MODEL)
    assert f"{tmp_path / 'img.seg.dcm'}: the source has no valid PixelSpacing" in caplog.text


def test_a_qc_flagged_seg_says_so_and_stays_valid(tmp_path: Path) -> None:
    """A flagged image's SEG is written, marked: "QC flag" first in the series description
    (an LO value is cut at 64 characters), the reasons in the content description."""
    path = _source(tmp_path, "DX ImagerPixelSpacing only")
    reasons = "mean_entropy 0.41 > 0.2; area_fraction.lung 0.02 < 0.1"
    seg_path = Path(export_dicom_seg(path, _mask(1), ["lung"], tmp_path / "x.seg.dcm", MODEL, qc_flag=reasons))
    seg = pydicom.dcmread(seg_path)
    assert seg.SeriesDescription.startswith("QC flag: lung-xray 0285f3c1db69")
    assert seg.ContentDescription.startswith("QC flag: mean_entropy 0.41 > 0.2")
    assert len(seg.ContentDescription) <= 64
    np.testing.assert_array_equal(hd.seg.segread(seg_path).get_pixels_by_source_instance(
        source_sop_instance_uids=[pydicom.dcmread(path).SOPInstanceUID])[0, ..., 0], _mask(1))
    assert dciodvfy_errors(seg_path) == []


def test_export_refuses_a_mask_that_does_not_fit(tmp_path: Path) -> None:
    path = _source(tmp_path, "DX without spacing")
    with pytest.raises(ConfigError, match="does not match the source image"):
        export_dicom_seg(path, np.zeros((10, 10), np.uint8), ["lung"], tmp_path / "seg.dcm", MODEL)
    with pytest.raises(ConfigError, match="label 3 but only 1 class names"):
        export_dicom_seg(path, _mask(3), ["lung"], tmp_path / "seg.dcm", MODEL)
    assert not (tmp_path / "seg.dcm").exists()


# -- the geometry rule, on headers alone ------------------------------------------------------------


def _header(**attributes: Any) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("attributes", "spacing", "nominal"),
    [
        ({"PixelSpacing": [0.139, 0.143], "ImagerPixelSpacing": [0.2, 0.2]}, (0.139, 0.143), False),
        ({"ImagerPixelSpacing": [0.2, 0.1]}, (0.2, 0.1), False),
        ({"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.15, 0.15]}, (0.15, 0.15), False),
        ({"PixelSpacing": [0, 0]}, (NOMINAL_MM, NOMINAL_MM), True),
        ({"PixelSpacing": [0.1, -0.1]}, (NOMINAL_MM, NOMINAL_MM), True),
        ({"PixelSpacing": [0.1]}, (NOMINAL_MM, NOMINAL_MM), True),
        ({}, (NOMINAL_MM, NOMINAL_MM), True),
        # patient coordinates without a slice thickness: highdicom cannot copy them
        ({"FrameOfReferenceUID": "1.2.3", "ImagePositionPatient": [0, 0, 0], "PixelSpacing": [0.5, 0.5],
          "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}, (0.5, 0.5), False),
    ],
)  # fmt: skip
def test_own_frame_takes_the_first_valid_spacing(attributes: dict, spacing: tuple, nominal: bool) -> None:
    assert own_frame(_header(**attributes)) == OwnFrame(spacing, nominal)


def test_a_source_with_patient_coordinates_keeps_them() -> None:
    header = _header(FrameOfReferenceUID="1.2.3", ImagePositionPatient=[0, 0, 0], PixelSpacing=[0.5, 0.5],
                     ImageOrientationPatient=[1, 0, 0, 0, 1, 0], SliceThickness=1.25)  # fmt: skip
    assert own_frame(header) is None


# -- dcmqi (segimage2itkimage) and dciodvfy ---------------------------------------------------------


def _segimage2itkimage() -> str:
    """dcmqi's converter: the console script beside this Python (the 'readers' extra)."""
    found = shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent))
    found = found or shutil.which("segimage2itkimage")
    if found is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install segpipe[readers])")
    return found


def dcmqi_convert(seg: Path, folder: Path) -> dict[str, Any]:
    """Run segimage2itkimage on ``seg`` into ``folder``; asserts it succeeds and returns its
    meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([_segimage2itkimage(), "--inputDICOM", str(seg), "--outputDirectory", str(folder)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((folder / "meta.json").read_text())


def read_nrrd(path: Path) -> tuple[dict[str, str], np.ndarray]:
    """The header fields and voxels (z, y, x) of a NRRD as dcmqi writes it (gzip, little-endian
    short): just enough of the format to check its output."""
    head, _, data = path.read_bytes().partition(b"\n\n")
    lines = head.decode().splitlines()[1:]
    fields = dict(line.split(": ", 1) for line in lines if not line.startswith("#"))
    assert (fields["type"], fields["endian"], fields["encoding"]) == ("short", "little", "gzip")
    sizes = [int(v) for v in fields["sizes"].split()]
    return fields, np.frombuffer(gzip.decompress(data), "<i2").reshape(sizes[::-1])


def dciodvfy_errors(seg: Path) -> list[str]:
    """dciodvfy's Error lines about ``seg`` (skips when dicom3tools is not installed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed; `make` installs it")
    done = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_dcmqi_converts_each_segment(exported: Exported, tmp_path: Path) -> None:
    meta = dcmqi_convert(exported.seg, tmp_path / "itk")

    assert MODEL.name in meta["SeriesDescription"] and meta["ContentCreatorName"] == "segpipe^"
    segments = [s for group in meta["segmentAttributes"] for s in group]
    assert [s["SegmentLabel"] for s in segments] == list(exported.classes)
    row, column = EXPECTED_SPACING[exported.source_name]
    for number, group in enumerate(meta["segmentAttributes"], start=1):
        [attributes] = group
        label = attributes["labelID"]
        assert attributes["recommendedDisplayRGBValue"] == list(class_colour(label))
        fields, voxels = read_nrrd(tmp_path / "itk" / f"{number}.nrrd")
        assert voxels.shape == (1, *HW)
        np.testing.assert_array_equal(voxels[0] != 0, exported.mask == label)
        directions = [[float(v) for v in d.strip("()").split(",")] for d in fields["space directions"].split()]
        assert directions[0] == pytest.approx([column, 0, 0]) and directions[1] == pytest.approx([0, row, 0])


def test_dciodvfy_finds_no_error(exported: Exported) -> None:
    assert dciodvfy_errors(exported.seg) == []


# -- the demo's real DICOM -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rg1() -> Path:
    """pydicom-data's RG1_UNCR (the demo's chest CR: 1955x1841, MONOCHROME1, PixelSpacing
    [0, 0]), where that package is installed (`segpipe demo` installs it)."""
    from flows.demo import XRAY

    dist, name = XRAY
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed (`segpipe demo` installs it)")
    found = [f for f in files if str(f) == name]
    if not found:
        pytest.skip(f"{dist} is installed without {name}")
    return Path(found[0].locate()).resolve()


def test_the_demo_xray_seg_opens_in_every_reader(rg1: Path, tmp_path: Path) -> None:
    header = pydicom.dcmread(rg1, stop_before_pixels=True)
    mask = np.zeros((header.Rows, header.Columns), np.uint8)
    mask[300:1500, 200:800] = mask[300:1500, 1000:1600] = 1  # two "lungs"
    seg_path = Path(export_dicom_seg(rg1, mask, ["lung"], tmp_path / "rg1.seg.dcm", MODEL))

    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[header.SOPInstanceUID])
    np.testing.assert_array_equal(pixels[0, ..., 0], mask)
    assert seg.PatientID == header.PatientID
    dcmqi_convert(seg_path, tmp_path / "itk")
    _, voxels = read_nrrd(tmp_path / "itk" / "1.nrrd")
    np.testing.assert_array_equal(voxels[0] != 0, mask == 1)
    assert dciodvfy_errors(seg_path) == []


def test_model_id_comes_from_the_stores_provenance() -> None:
    card = {"name": "lung-xray", "weights_sha256": "0285f3c1db69" + "0" * 52}
    assert ModelId.from_provenance({"path": "/m/x.safetensors", "card": card}) == MODEL
    # a checkpoint without a card name: its file name, and the file's digest
    without = {"path": "/m/tiny.safetensors", "sha256": "ab" * 32, "card": {"name": ""}}
    assert ModelId.from_provenance(without) == ModelId("tiny", "abababababab")
    assert ModelId.from_provenance({}) == ModelId("unknown", "unknown")


# -- end to end: `segpipe run --export dicom-seg` ---------------------------------------------------


def test_a_run_exports_a_seg_every_reader_opens(flows_env: None, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline import cards
    from pipeline.store import OutputStore

    scan = _source(tmp_path / "in", "CR PixelSpacing [0, 0] (as RG1_UNCR)")
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["run", str(scan), "-m", str(tiny_checkpoint), "-o", str(out), "--tile", "32",
                                    "--allow-grey", "--export", "dicom-seg"])  # fmt: skip
    assert done.exit_code == 0, done.output

    [seg_path] = out.glob("*.seg.dcm")
    mask = OutputStore.open(seg_path.with_suffix("").with_suffix(".zarr")).mask[...]
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[pydicom.dcmread(scan).SOPInstanceUID])
    np.testing.assert_array_equal(pixels[0, ..., 0], mask == 1)
    card = cards.read_card(tiny_checkpoint)  # the tiny model's card has no name: its file's
    [algorithm] = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny", card.weights_sha256[:12])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == card.class_names
    dcmqi_convert(seg_path, tmp_path / "itk")
    _, voxels = read_nrrd(tmp_path / "itk" / "1.nrrd")
    np.testing.assert_array_equal(voxels[0] != 0, mask == 1)
    assert dciodvfy_errors(seg_path) == []
