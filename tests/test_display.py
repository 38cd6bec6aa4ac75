"""One home for display decisions (pipeline.display): the overlay export and the store's
NGFF label colours agree for every class; grey and windowing do what the module says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image as PILImage

from pipeline import stages
from pipeline.config import RunConfig
from pipeline.display import (
    GREY_WEIGHTS,
    PALETTE,
    WINDOW_PERCENTILES,
    class_colour,
    class_colours,
    to_grey,
    window_uint8,
)
from pipeline.job import ImageJob
from pipeline.store import OutputStore

BLOCK = 10


def _store_with_mask(path: Path, classes: list[str], mask: np.ndarray) -> OutputStore:
    """A store of ``mask``'s shape holding ``mask`` and a flat grey preview."""
    hw = mask.shape
    store = OutputStore.create_or_open(
        path, image_id="img", full_hw=hw, work_hw=hw, tile=16, full_chunk=16,
        classes=classes, provenance={"input": {"sha256": "ab" * 32}, "model": {"sha256": "cd" * 32},
                                     "run": RunConfig(tile=16).to_dict()},
    )  # fmt: skip
    store.mask[...] = mask
    store.write_preview(np.full((*hw, 3), 128, np.uint8))
    return store


def test_overlay_and_ngff_label_colours_agree_for_every_class(tmp_path: Path) -> None:
    n = len(PALETTE) + 2  # past the palette's end, where colours wrap round
    classes = [f"class{k}" for k in range(1, n + 1)]
    mask = np.zeros((4 * BLOCK, n * BLOCK), np.uint8)
    for k in range(1, n + 1):  # class k: a block in columns [(k-1)*BLOCK, k*BLOCK)
        mask[BLOCK : 3 * BLOCK, (k - 1) * BLOCK : k * BLOCK] = k
    store = _store_with_mask(tmp_path / "img.zarr", classes, mask)
    job = ImageJob(image_id="img", input_path=str(tmp_path / "img.png"), store_path=store.path,
                   full_hw=mask.shape, work_hw=mask.shape, tile=16, halo=0)  # fmt: skip

    written = stages.export(job, RunConfig(), ("overlay",))
    overlay = np.asarray(PILImage.open(written["overlay"]))
    label = zarr.open_group(store.path, mode="r")["labels/mask"].attrs["ome"]["image-label"]

    ngff = {c["label-value"]: tuple(c["rgba"][:3]) for c in label["colors"] if c["label-value"]}
    # each block's top row borders the background: the overlay outlines it in pure class colour
    drawn = {k: tuple(int(v) for v in overlay[BLOCK, (k - 1) * BLOCK + BLOCK // 2])
             for k in range(1, n + 1)}  # fmt: skip
    assert drawn == ngff
    assert len(set(drawn.values())) == len(PALETTE)


def test_class_colours_wrap_round_and_leave_background_black() -> None:
    assert class_colour(1) == PALETTE[0] and class_colour(len(PALETTE) + 1) == PALETTE[0]
    with pytest.raises(ValueError, match="label=0"):
        class_colour(0)
    colours = class_colours(np.array([[0, 1, len(PALETTE) + 2]]))
    assert colours.dtype == np.uint8
    assert [tuple(c) for c in colours[0]] == [(0, 0, 0), PALETTE[0], PALETTE[1]]


def test_grey_uses_one_formula_and_keeps_the_dtype() -> None:
    rgba = np.zeros((2, 2, 4), np.uint16)
    rgba[..., 0], rgba[..., 3] = 1000, 65535  # red and an opaque alpha, which is dropped
    grey = to_grey(rgba)
    assert grey.shape == (2, 2) and grey.dtype == np.uint16
    assert int(grey[0, 0]) == round(1000 * GREY_WEIGHTS[0])
    assert to_grey(np.ones((3, 2, 1), np.float32)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2\)"):
        to_grey(np.zeros((2, 2, 2), np.uint8))


def test_window_keeps_8_bit_values_and_stretches_deeper_ones() -> None:
    eight_bit = np.arange(256, dtype=np.uint16).reshape(16, 16)  # within 0..255: as it is
    np.testing.assert_array_equal(window_uint8(eight_bit), eight_bit.astype(np.uint8))

    deep = np.linspace(0, 4000, 10_000).reshape(100, 100)
    deep[0, 0] = 60_000  # one burned-in marker must not flatten the contrast
    out = window_uint8(deep)
    assert out.dtype == np.uint8 and out.shape == deep.shape
    low, high = np.percentile(deep, WINDOW_PERCENTILES)
    assert out[deep <= low].max() == 0 and out[deep >= high].min() == 255
    assert out[50, 0] == round((deep[50, 0] - low) / (high - low) * 255)
