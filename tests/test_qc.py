"""The QC verdict (pipeline.qc): measures on synthetic probabilities, judged against a
card's ranges; a good case passes, bad ones are flagged with their reasons."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import qc

LUNGS = {"min_area_fraction": 0.01, "keep_largest": 2, "fill_holes": True}
SPEC = {"ranges": {"mean_entropy": [None, 0.1], "area_fraction.lung": [0.15, 0.5],
                   "components.lung": [2, 2], "cleaned_fraction": [None, 0.1]},
        "how": "test ranges"}  # fmt: skip


def lungs_probs(confident: bool = True, seed: int = 0) -> np.ndarray:
    """(64, 64, 1) probabilities of two lungs: near 0/1 when confident, else mushy."""
    rng = np.random.default_rng(seed)
    m = np.zeros((64, 64), bool)
    m[12:56, 6:28] = m[12:56, 36:58] = True
    if confident:
        p = np.where(m, rng.uniform(0.99, 1.0, m.shape), rng.uniform(0.0, 0.01, m.shape))
    else:
        p = np.where(m, rng.uniform(0.5, 0.7, m.shape), rng.uniform(0.2, 0.49, m.shape))
    return p.astype(np.float32)[..., None]


def test_a_confident_two_lung_mask_passes() -> None:
    measures = qc.measure_whole(lungs_probs(), ["lung"], 0.5, LUNGS)
    assert measures["components.lung"] == 2
    assert measures["area_fraction.lung"] == pytest.approx(2 * 44 * 22 / 64**2)
    assert measures["cleaned_fraction"] == 0
    verdict = qc.judge(measures, SPEC)
    assert verdict.verdict == "pass" and verdict.reasons == () and verdict.checked == 4


def test_an_unsure_model_is_flagged_for_its_entropy() -> None:
    verdict = qc.judge(qc.measure_whole(lungs_probs(confident=False), ["lung"], 0.5, LUNGS), SPEC)
    assert verdict.flagged
    assert [r.split()[0] for r in verdict.reasons] == ["mean_entropy"]


def test_scattered_blobs_are_flagged_for_area_and_what_cleaning_removed() -> None:
    """A non-chest image: many small confident 'lungs'; keep_largest leaves two small ones."""
    p = np.zeros((64, 64, 1), np.float32)
    for y in range(4, 60, 10):
        for x in range(4, 60, 10):
            p[y : y + 7, x : x + 7] = 0.99  # 49 px, above the 1 % cut
    verdict = qc.judge(qc.measure_whole(p, ["lung"], 0.5, LUNGS), SPEC)
    assert verdict.flagged
    named = {r.split()[0] for r in verdict.reasons}
    assert named == {"area_fraction.lung", "cleaned_fraction"}


def test_one_lung_missing_is_flagged_for_its_components() -> None:
    p = lungs_probs()
    p[:, 32:] = 0.0
    verdict = qc.judge(qc.measure_whole(p, ["lung"], 0.5, LUNGS), SPEC)
    assert "components.lung 1 < 2" in verdict.reasons


def test_no_post_processing_counts_raw_components() -> None:
    p = lungs_probs()
    p[0:3, 0:3] = 0.9
    assert qc.measure_whole(p, ["lung"], 0.5, LUNGS)["components.lung"] == 2
    raw = qc.measure_whole(p, ["lung"], 0.5, {})
    assert raw["components.lung"] == 3 and "cleaned_fraction" not in raw


def test_tiles_streamed_give_the_whole_image_entropy_and_area() -> None:
    p = lungs_probs(confident=False, seed=3)
    whole = qc.measure_whole(p, ["lung"], 0.5, {})
    blocks = [p[:32, :32], p[:32, 32:], p[32:, :32], p[32:, 32:]]
    streamed = qc.measure_tiles(blocks, ["lung"], 0.5, 64 * 64)
    assert streamed["mean_entropy"] == pytest.approx(whole["mean_entropy"], abs=1e-5)
    assert streamed["area_fraction.lung"] == whole["area_fraction.lung"]
    assert "components.lung" not in streamed


def test_entropy_is_zero_when_sure_and_one_at_a_coin_toss() -> None:
    assert qc.entropy(np.array([[[0.0], [1.0], [0.5]]], np.float32)).tolist() == [[0.0, 0.0, 1.0]]
    three = np.full((1, 1, 2), 1 / 3, np.float32)  # two foreground classes + background
    assert qc.entropy(three)[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_multi_class_labels_follow_delivery() -> None:
    p = np.array([[[0.1, 0.2], [0.6, 0.3], [0.2, 0.5]]], np.float32)
    assert qc.labels_of(p, 0.5).tolist() == [[0, 1, 2]]


def test_a_card_without_ranges_passes_unchecked() -> None:
    verdict = qc.judge({"mean_entropy": 0.9}, {})
    assert verdict.verdict == "pass" and verdict.checked == 0


@pytest.mark.parametrize(("spec", "phrase"), [
    ({"ranges": {"sharpness": [0, 1]}}, "qc.ranges.sharpness is not a measure"),
    ({"ranges": {"mean_entropy": [0]}}, "qc.ranges.mean_entropy=[0]"),
    ({"ranges": {"mean_entropy": ["a", 1]}}, "is not [low | null, high | null]"),
    ({"limits": {}}, "qc.limits is not a QC key"),
    ("strict", "qc must be an object"),
])  # fmt: skip
def test_bad_specs_are_named(spec: object, phrase: str) -> None:
    problems = qc.check_spec(spec)
    assert problems and phrase in problems[0]
