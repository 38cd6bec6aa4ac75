"""Post-processing a card declares (pipeline.postprocess): the steps on tiny masks, the
probabilities delivery reads, and which cards may declare it."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import postprocess
from pipeline.engine.stitching import to_labels, upsample_region
from pipeline.engine.tiling import Box

LUNGS = {"min_area_fraction": 0.01, "keep_largest": 2, "fill_holes": True}


def two_lungs_and_junk() -> np.ndarray:
    """A 64² mask: two 'lungs' (one with a hole), a large blob in the neck, a speck."""
    m = np.zeros((64, 64), bool)
    m[20:56, 6:28] = True  # right lung, 792 px
    m[34:40, 14:20] = False  # a hole in its lower lobe
    m[20:56, 36:58] = True  # left lung, 792 px
    m[2:12, 26:38] = True  # neck blob, 120 px
    m[60, 2] = True  # a speck: 1 px < 1 % of 4096
    return m


def test_keep_largest_drops_smaller_components_and_fills_holes() -> None:
    raw = two_lungs_and_junk()
    out = postprocess.clean_mask(raw, LUNGS)
    assert postprocess.count_components(raw) == 4
    assert postprocess.count_components(out) == 2
    assert not out[2:12, 26:38].any() and not out[60, 2]  # blob and speck gone
    assert out[34:40, 14:20].all()  # the hole filled
    assert (out[20:56, 36:58]).all()  # the lungs untouched
    assert raw.sum() == two_lungs_and_junk().sum()  # the input is not changed


def test_each_step_alone() -> None:
    raw = two_lungs_and_junk()
    speckless = postprocess.clean_mask(raw, {"min_area_fraction": 0.01})
    assert postprocess.count_components(speckless) == 3 and not speckless[60, 2]
    assert not speckless[34:40, 14:20].any()  # holes stay without fill_holes
    one = postprocess.clean_mask(raw, {"keep_largest": 1})
    assert postprocess.count_components(one) == 1
    filled = postprocess.clean_mask(raw, {"fill_holes": True})
    assert postprocess.count_components(filled) == 4 and filled[34:40, 14:20].all()
    assert (postprocess.clean_mask(raw, {}) == raw).all()


def test_diagonal_pixels_are_one_component_and_a_diagonal_gap_no_hole() -> None:
    m = np.zeros((8, 8), bool)
    m[[1, 2, 3], [1, 2, 3]] = True  # a diagonal line: 8-connected foreground
    assert postprocess.count_components(m) == 1
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    ring[1, 1] = False  # the hole leaks out through a diagonal corner? not 4-connected
    assert postprocess.clean_mask(ring, {"fill_holes": True})[3, 3]


def test_apply_edits_probabilities_so_delivery_follows_the_cleaned_mask() -> None:
    raw = two_lungs_and_junk()
    rng = np.random.default_rng(0)
    probs = np.where(raw, rng.uniform(0.6, 1.0, raw.shape), rng.uniform(0.0, 0.4, raw.shape))
    probs = probs.astype(np.float32)[..., None]
    edited = postprocess.apply(probs, 0.5, LUNGS)
    cleaned = postprocess.clean_mask(raw, LUNGS)
    assert ((edited[..., 0] >= 0.5) == cleaned).all()
    unchanged = raw == cleaned
    assert (edited[unchanged] == probs[unchanged]).all()  # only the cleaned pixels move
    # delivered at 4x: the full-resolution mask has two components and no hole
    full = to_labels(upsample_region(edited, Box(0, 0, 64, 64), Box(0, 0, 256, 256), (64, 64), (256, 256)), 0.5)
    assert postprocess.count_components(full == 1) == 2
    assert full[34 * 4 : 40 * 4, 14 * 4 : 20 * 4].all()
    assert not full[8:48, 104:152].any()


def test_apply_without_spec_returns_the_probabilities() -> None:
    probs = np.full((4, 4, 1), 0.7, np.float32)
    assert postprocess.apply(probs, 0.5, {}) is probs


@pytest.mark.parametrize(("spec", "phrase"), [
    ({"keep_largest": 0}, "keep_largest=0"),
    ({"keep_largest": True}, "keep_largest=True"),
    ({"min_area_fraction": 1.5}, "min_area_fraction=1.5"),
    ({"fill_holes": "yes"}, "fill_holes='yes'"),
    ({"dilate": 3}, "postprocess.dilate is not a step"),
    ([1, 2], "must be an object"),
])  # fmt: skip
def test_bad_specs_are_named(spec: object, phrase: str) -> None:
    problems = postprocess.check_spec(spec)
    assert problems and phrase in problems[0]


def test_only_fixed_size_binary_models_may_declare_it() -> None:
    assert postprocess.card_problems(LUNGS, {"size": [256, 256]}, 1) == []
    assert postprocess.card_problems({}, {"mpp": 0.5}, 1) == []
    slide = postprocess.card_problems(LUNGS, {"mpp": 0.5}, 1)
    assert any("fixed working size" in p for p in slide)
    assert any("fixed working size" in p for p in postprocess.card_problems(LUNGS, None, 1))
    assert any("binary" in p for p in postprocess.card_problems(LUNGS, {"size": [64, 64]}, 3))


def test_a_card_declaring_it_on_a_slide_model_is_refused_when_read() -> None:
    from pipeline.cards import ModelCard
    from pipeline.errors import CheckpointError

    xray = ModelCard(arch="unet", config={"filters": [4, 8]}, scale={"size": [64, 64]}, postprocess=LUNGS,
                     qc={"ranges": {"components.lung": [2, 2]}, "how": "by hand"})  # fmt: skip
    xray.validate()
    slide = ModelCard(arch="unet", config={"filters": [4, 8]}, scale={"mpp": 0.5}, postprocess=LUNGS)
    with pytest.raises(CheckpointError, match="fixed working size"):
        slide.validate("slide.safetensors")
    with pytest.raises(CheckpointError, match="qc.ranges.sharpness"):
        ModelCard.from_json(ModelCard(arch="unet", config={"filters": [4, 8]},
                                      qc={"ranges": {"sharpness": [0, 1]}}).to_json(), "x.safetensors")
