"""Post-processing, the QC verdict and --mpp through the engine (pipeline.segment, one
process): what the store, its provenance and its exports say. Tiny models with fixed
random weights; the shipped lung model on the leg radiograph where pydicom-data is here."""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
import pytest

from pipeline import postprocess
from pipeline.engine.stitching import to_labels, upsample_region
from pipeline.engine.tiling import Box
from pipeline.io import resize
from pipeline.io.exports import QC_KEY
from pipeline.local import segment
from pipeline.store import OutputStore
from tests.io_fixtures import dicom_dataset, write_dicom, xray_pixels
from tests.test_inference import save, tiny

EXACT = {"precision": "fp32", "prob_dtype": "float32", "exports": ()}
KEEP_ONE = {"min_area_fraction": 0.002, "keep_largest": 1, "fill_holes": True}


def grey_png(path: Path, shape: tuple[int, int] = (300, 260), seed: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    grey = resize(rng.random((10, 10, 1)).astype(np.float32), shape) * 255
    PIL.Image.fromarray(grey[..., 0].astype(np.uint8)).save(path)
    return path


def lung_like_model(tmp_path: Path, **card) -> str:
    """A tiny grey U-Net at a fixed 64² working size; its threshold cuts the random output
    into many components (the card's, unless given)."""
    return save(tiny("unet", in_channels=1), tmp_path / "m.safetensors", scale={"size": [64, 64]},
                normalization={"kind": "percentile", "low": 1, "high": 99}, **card)


def median_threshold(tmp_path: Path, image: Path) -> float:
    probe = OutputStore.open(segment(image, lung_like_model(tmp_path), tmp_path / "probe", tile=64, **EXACT))
    return float(np.median(probe.read_prob()))


def test_the_cards_post_processing_shapes_the_delivered_mask(tmp_path: Path) -> None:
    """The mask is the stored (raw) probabilities, cleaned whole at the working level and
    delivered: one component there, whatever the tiling; --no-postprocess delivers raw."""
    image = grey_png(tmp_path / "cxr.png")
    threshold = median_threshold(tmp_path, image)
    model = lung_like_model(tmp_path / "pp", threshold=threshold, postprocess=KEEP_ONE)
    one = OutputStore.open(segment(image, model, tmp_path / "one", tile=64, **EXACT))
    four = OutputStore.open(segment(image, model, tmp_path / "four", tile=32, **EXACT))
    raw = OutputStore.open(segment(image, model, tmp_path / "raw", tile=32, postprocess=False, **EXACT))

    probs = one.read_prob()
    work, full = Box(0, 0, 64, 64), Box(0, 0, 300, 260)
    assert postprocess.count_components(probs[..., 0] >= threshold) > 1  # there was work to do
    cleaned = postprocess.apply(probs, threshold, KEEP_ONE)
    assert postprocess.count_components(cleaned[..., 0] >= threshold) == 1
    expected = to_labels(upsample_region(cleaned, work, full, (64, 64), (300, 260)), threshold)
    np.testing.assert_array_equal(np.asarray(one.mask), expected)
    np.testing.assert_array_equal(np.asarray(four.mask), expected)  # 4 tiles, each cleans the whole
    np.testing.assert_array_equal(four.read_prob(), probs)  # prob keeps the model's values
    delivered_raw = to_labels(upsample_region(probs, work, full, (64, 64), (300, 260)), threshold)
    np.testing.assert_array_equal(np.asarray(raw.mask), delivered_raw)
    assert (expected != delivered_raw).any()

    assert one.provenance["postprocess"] == {"applied": KEEP_ONE}
    assert raw.provenance["postprocess"]["applied"] == {}
    assert raw.provenance["postprocess"]["why"] == "--no-postprocess"
    assert one.summary()["qc"]["measures"]["components.foreground"] == 1
    assert raw.summary()["qc"]["measures"]["components.foreground"] > 1


def test_every_complete_image_carries_a_qc_verdict_and_flagged_exports_say_so(tmp_path: Path) -> None:
    """Ranges the output meets: pass; ranges it cannot meet: flag, with the reasons, and
    each export still written, marked (DICOM SEG series description, PNG text, overlay frame)."""
    ds = dicom_dataset(xray_pixels(96, 80, bits=12), 12, "MONOCHROME2")
    ds.ImagerPixelSpacing = [0.2, 0.2]
    source = write_dicom(tmp_path / "cxr.dcm", ds)
    wide = {"ranges": {"mean_entropy": [None, 1.0], "area_fraction.foreground": [0.0, 1.0]}, "how": "test"}
    narrow = {"ranges": {"mean_entropy": [None, 0.0], "area_fraction.foreground": [1.5, None]}, "how": "test"}
    exports = ("overlay", "png", "ome-tiff", "dicom-seg")
    settings = {**EXACT, "exports": exports}

    good = OutputStore.open(segment(source, lung_like_model(tmp_path / "a", qc=wide), tmp_path / "a", **settings))
    assert good.summary()["qc"]["verdict"] == "pass" and good.summary()["qc"]["checked"] == 2
    seg = pydicom.dcmread(f"{good.path.removesuffix('.zarr')}.seg.dcm", stop_before_pixels=True)
    assert "QC flag" not in seg.SeriesDescription

    bad = OutputStore.open(segment(source, lung_like_model(tmp_path / "b", qc=narrow), tmp_path / "b", **settings))
    verdict = bad.summary()["qc"]
    assert verdict["verdict"] == "flag" and bad.state == "complete"
    assert {r.split()[0] for r in verdict["reasons"]} == {"mean_entropy", "area_fraction.foreground"}
    assert bad.provenance["qc"] == verdict
    base = bad.path.removesuffix(".zarr")
    seg = pydicom.dcmread(f"{base}.seg.dcm", stop_before_pixels=True)
    assert seg.SeriesDescription.startswith("QC flag")
    assert "mean_entropy" in seg.ContentDescription
    assert PIL.Image.open(f"{base}.mask.png").text[QC_KEY].startswith("flag: ")
    overlay = PIL.Image.open(f"{base}.overlay.png")
    assert overlay.text[QC_KEY].startswith("flag: ")
    assert tuple(np.asarray(overlay)[0, 0]) == (255, 200, 0)  # the amber frame
    import tifffile

    with tifffile.TiffFile(f"{base}.mask.ome.tif") as tif:
        assert 'Name="mask (QC flag: ' in tif.ome_metadata


def test_mpp_gives_a_file_without_pixel_size_its_slide_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    rgb = np.clip(resize(rng.random((8, 8, 3)).astype(np.float32), (256, 320)) * 255, 0, 255)
    PIL.Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "tile.png")
    model = save(tiny("unet"), tmp_path / "m.safetensors", scale={"mpp": 0.5})
    with caplog.at_level(logging.WARNING):
        unknown = OutputStore.open(segment(tmp_path / "tile.png", model, tmp_path / "a", tissue=False, **EXACT))
    assert unknown.layout.work_hw == (256, 320)  # its own scale: nothing to choose by
    assert [r for r in caplog.records if "no pixel size in the file and no --mpp" in r.getMessage()]
    assert unknown.provenance["input"]["mpp_from"] is None

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        given = OutputStore.open(segment(tmp_path / "tile.png", model, tmp_path / "b", tissue=False,
                                         mpp=0.25, **EXACT))  # fmt: skip
    assert given.layout.work_hw == (128, 160)  # 0.25 µm/px resampled to the model's 0.5
    assert given.layout.mpp == 0.25 and given.provenance["run"]["mpp"] == 0.25
    assert given.provenance["input"]["mpp_from"] == "--mpp"
    assert not [r for r in caplog.records if "pixel size" in r.getMessage()]
    # a slide model's verdict is measured tile by tile: entropy and area, no components
    measures = given.summary()["qc"]["measures"]
    assert set(measures) == {"mean_entropy", "area_fraction.foreground"}
    assert measures["area_fraction.foreground"] == pytest.approx(float(np.asarray(given.mask).mean()), abs=0.02)


def _pydicom_data_file(name: str) -> Path:
    try:
        files = metadata.distribution("pydicom-data").files or []
    except metadata.PackageNotFoundError:
        pytest.skip("pydicom-data is not installed (`segpipe demo` installs it)")
    found = [f for f in files if str(f) == f"data_store/data/{name}"]
    if not found:
        pytest.skip(f"pydicom-data is installed without {name}")
    return Path(found[0].locate()).resolve()


def test_a_leg_radiograph_through_the_lung_model_is_flagged(tmp_path: Path) -> None:
    """pydicom-data's RG3_UNCR: a CR of a lower limb (BodyPartExamined EXTREMITY)."""
    leg = _pydicom_data_file("RG3_UNCR.dcm")
    store = OutputStore.open(segment(leg, "lung-xray", tmp_path / "out", exports=()))
    verdict = store.summary()["qc"]
    assert store.state == "complete" and verdict["verdict"] == "flag", verdict
    assert verdict["checked"] >= 3


def test_a_synthetic_limb_through_the_lung_model_is_flagged(tmp_path: Path) -> None:
    """Without pydicom-data: a drawn limb (soft tissue and a bone down the middle). What the
    lung model finds there is no pair of lungs (the shipped one: specks, all cleaned away)."""
    yy, xx = np.mgrid[:600, :400]
    limb = 40 + 150 * np.exp(-(((xx - 200) / 60.0) ** 2)) + 30 * np.exp(-(((xx - 200) / 15.0) ** 2))
    limb = limb + np.random.default_rng(0).normal(0, 4, limb.shape)
    PIL.Image.fromarray(limb.clip(0, 255).astype(np.uint8)).save(tmp_path / "limb.png")
    store = OutputStore.open(segment(tmp_path / "limb.png", "lung-xray", tmp_path / "out", exports=()))
    verdict = store.summary()["qc"]
    assert verdict["verdict"] == "flag", verdict
    assert verdict["reasons"] and verdict["checked"] >= 3


def test_an_output_completed_before_qc_verdicts_gets_one_on_its_next_run(tmp_path: Path) -> None:
    import zarr

    image = grey_png(tmp_path / "cxr.png")
    model = lung_like_model(tmp_path)
    path = segment(image, model, tmp_path / "out", **EXACT)
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["segpipe"])
    meta["provenance"] = {k: v for k, v in meta["provenance"].items() if k != "qc"}
    group.attrs["segpipe"] = meta
    assert OutputStore.open(path).summary()["qc"] is None
    segment(image, model, tmp_path / "out", **EXACT)  # complete: nothing runs, finalize verifies
    assert OutputStore.open(path).summary()["qc"]["verdict"] == "pass"
