"""The input's kind against the model card: what the model sees is what it was made for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import pipeline
from pipeline.engine.normalization import image_stats
from pipeline.errors import InputError
from pipeline.store import OutputStore


def test_a_grey_image_through_a_colour_model_is_refused_unless_allowed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(grey)
    with pytest.raises(InputError, match=r"grey\.png: a grey image.*expects colour.*--allow-grey"):
        pipeline.segment(grey, tiny_checkpoint, tmp_path / "out", tile=32, exports=())
    assert not list(tmp_path.glob("out/*.zarr"))  # refused before anything was written
    done = pipeline.segment(grey, tiny_checkpoint, tmp_path / "out", tile=32, exports=(), allow_grey=True)
    assert OutputStore.open(done).state == "complete"


def test_alpha_does_not_move_the_normalisation_window() -> None:
    rgb = np.random.default_rng(1).integers(0, 120, (40, 50, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 255, np.uint8)], axis=2)  # opaque
    spec = {"kind": "percentile", "low": 1, "high": 99}
    assert image_stats(rgba, spec, 3) == image_stats(rgb, spec, 3)
    assert image_stats(rgba, spec, 1) == image_stats(rgb, spec, 1)


@pytest.fixture(scope="module")
def chest_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny grey U-Net whose card takes projection radiographs only (CR, DX)."""
    from pipeline import cards
    from pipeline.models import build_model, checkpoint

    path = tmp_path_factory.mktemp("chest") / "chest.safetensors"
    model = build_model("unet", in_channels=1, classes=1, filters=[4, 8, 16])
    checkpoint.save(model, cards.ModelCard(arch="", config={}, name="chest", modalities=["CR", "DX"]), path)
    return path


def test_a_dicom_of_a_modality_the_card_does_not_list_is_refused_unless_allowed(
    chest_checkpoint: Path, tmp_path: Path
) -> None:
    from tests.io_fixtures import dicom_dataset, write_dicom, xray_pixels

    scan = dicom_dataset(xray_pixels(64, 48, 12), 12)
    scan.Modality = "MR"  # a shoulder MR, say: the lung model gave it a confident 16 % "lung"
    mr = write_dicom(tmp_path / "mr.dcm", scan)
    with pytest.raises(InputError, match=r"mr\.dcm: a DICOM of modality MR, and the model chest takes CR, DX; "
                                         r"run with --allow-modality"):  # fmt: skip
        pipeline.segment(mr, chest_checkpoint, tmp_path / "out", tile=32, exports=())
    assert not list(tmp_path.glob("out/*.zarr"))  # refused before anything was written
    done = pipeline.segment(mr, chest_checkpoint, tmp_path / "out", tile=32, exports=(), allow_modality=True)
    assert OutputStore.open(done).state == "complete"

    scan.Modality = "DX"
    dx = write_dicom(tmp_path / "dx.dcm", scan)
    assert OutputStore.open(pipeline.segment(dx, chest_checkpoint, tmp_path / "out", tile=32, exports=())).state == "complete"


def test_the_shipped_lung_model_takes_projection_radiographs_only() -> None:
    from pipeline import cards

    assert cards.read_card(cards.resolve("lung-xray")).modalities == ["CR", "DX"]
    with pytest.raises(pipeline.errors.CheckpointError, match="modalities"):
        cards.ModelCard(arch="unet", config={"filters": [4, 8]}, modalities=["mr; rm -rf"]).validate()
