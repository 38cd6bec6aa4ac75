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
