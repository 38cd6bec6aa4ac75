"""Files and cards that could cause unbounded work are refused before any is done: a run's
planned work is bounded by max_pixels / max_slide_pixels (limits.check_planned_work), a
card by sane bounds when it is read, weights by the shapes their card's model has (built on
the meta device) before anything is allocated; and the full-resolution mask's chunks stay
bounded whatever the model's scale (invariant 3)."""

from __future__ import annotations

import json
import resource
import struct
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import save_file

from pipeline import limits
from pipeline.cards import CARD_KEY, read_card, resolve
from pipeline.engine.tiling import Box, plan_tiles
from pipeline.errors import CheckpointError, InputError
from pipeline.io import open_image, preview, resize
from pipeline.io.ingest import resample_block
from pipeline.local import segment
from pipeline.models import build_model, checkpoint
from pipeline.store import OutputStore, StoreError
from tests.test_inference import EXACT, save, tiny


def write_empty_tiled_tiff(path: Path, size: int, tile: int = 1024) -> Path:
    """A classic little-endian TIFF declaring size x size uint8 in tile x tile tiles, every
    tile empty (offset and byte count 0, read as zeros): 65,536 tiles of 262144² take 512 KB.
    Written by hand: tifffile writes the zeros out (64 GB)."""
    n = (-(-size // tile)) ** 2
    short = [(258, 8), (259, 1), (262, 1), (277, 1), (284, 1), (322, tile), (323, tile)]
    entries = [(256, 4, 1, size), (257, 4, 1, size), *((tag, 3, 1, v) for tag, v in short)]
    offsets_at = 8 + 2 + 12 * (len(entries) + 2) + 4
    entries += [(324, 4, n, offsets_at), (325, 4, n, offsets_at + 4 * n)]
    out = bytearray(b"II" + struct.pack("<HIH", 42, 8, len(entries)))
    for tag, kind, count, value in sorted(entries):
        # a SHORT value sits left-justified in the entry's 4-byte value field
        out += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 else struct.pack(
            "<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0) + bytes(8 * n)
    path.write_bytes(bytes(out))
    return path


def write_card(path: Path, card: dict, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file with any card (no validation on the way: what an attacker writes)."""
    save_file(state or {"x": torch.zeros(1)}, str(path), metadata={CARD_KEY: json.dumps(card)})
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- planned work ---------------------------------------------------------------------------


def test_huge_declared_tiled_tiff_is_refused_before_anything_is_written(tmp_path):
    """262144² at max_slide_pixels with no pyramid: its tiles would read all 2^36 pixels, and
    its preview and its picture all of them again. Ran for over 10 minutes; now one line,
    nothing written."""
    path = write_empty_tiled_tiff(tmp_path / "huge.tif", 262144)
    assert path.stat().st_size < 600_000
    model = save(tiny("unet"), tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="max_slide_pixels=68719476736") as info:
        segment(path, model, tmp_path / "out", **EXACT)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "planned reads of 206158430208 pixels" in message and "--max-slide-pixels" in message
    assert not (tmp_path / "out").exists()


def test_a_smaller_tiff_without_a_pyramid_within_the_limit_runs(tmp_path):
    path = write_empty_tiled_tiff(tmp_path / "flat.tif", 512, tile=256)
    model = save(tiny("unet", in_channels=1), tmp_path / "m.safetensors")
    with pytest.raises(InputError, match="planned reads of 786432 pixels"):  # tiles, preview, picture
        segment(path, model, tmp_path / "refused", max_slide_pixels=2 * 512 * 512, **EXACT)
    out = segment(path, model, tmp_path / "out", max_slide_pixels=3 * 512 * 512, tile=256, **EXACT)
    assert OutputStore.open(out).state == "complete"


def test_a_card_scale_larger_than_max_pixels_is_refused_before_writing(tmp_path):
    """A legal card (4096² working size) on a 64² PNG makes 16.7M working pixels, over a
    run's max_pixels of 1M: refused with the planned size, its tiles and bytes."""
    PILImage.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "small.png")
    model = save(tiny("unet", in_channels=1), tmp_path / "m.safetensors", scale={"size": [4096, 4096]})
    with pytest.raises(InputError, match=r"planned working level 4096x4096 = 16777216 pixels "
                                         r"\(256 tiles of 256x256, [0-9.]+ GB") as info:  # fmt: skip
        segment(tmp_path / "small.png", model, tmp_path / "out", tile=256, max_pixels=1 << 20, **EXACT)
    assert "max_pixels=1048576; raise --max-pixels" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_too_many_tiles_are_refused_naming_the_tile_setting(tmp_path, monkeypatch):
    PILImage.fromarray(np.zeros((256, 256), np.uint8)).save(tmp_path / "x.png")
    model = save(tiny("unet", in_channels=1), tmp_path / "m.safetensors")
    monkeypatch.setattr(limits, "MAX_TILES", 10)  # the driver's status grid and scheduling
    with pytest.raises(InputError, match=r"planned 256 tiles of 16x16 .* exceed 10 per image; "
                                         r"raise --tile"):  # fmt: skip
        segment(tmp_path / "x.png", model, tmp_path / "out", tile=16, **EXACT)
    assert not (tmp_path / "out").exists()


def test_lung_xray_scale_keeps_full_resolution_chunks_bounded(tmp_path):
    """The shipped 256² model with the default tile on a 3072² X-ray: tile * scale would be
    a 12288² chunk (a 16384² X-ray: 65536²); it is 2048², and the mask is complete."""
    rng = np.random.default_rng(0)
    grey = np.clip(rng.normal(120, 30, (96, 96)), 0, 255).astype(np.uint8)
    PILImage.fromarray(grey).resize((3072, 3072)).save(tmp_path / "cxr.png", compress_level=1)
    store = OutputStore.open(segment(tmp_path / "cxr.png", "lung-xray", tmp_path / "out", exports=()))
    assert store.layout.full_chunk == 2048 and store.mask.chunks == (2048, 2048)
    assert store.state == "complete" and store.mask.shape == (3072, 3072)


# --- cards ---------------------------------------------------------------------------------

GOOD = {"arch": "unet", "config": {"in_channels": 1, "classes": 1, "filters": [4, 8, 16]},
        "class_names": ["lung"], "scale": {"size": [256, 256]}}  # fmt: skip


@pytest.mark.parametrize(("change", "named"), [
    ({"scale": {"size": [200000, 200000]}}, "scale.size=[200000, 200000]"),
    ({"scale": {"size": [256]}}, "scale.size=[256]"),
    ({"scale": {"size": [8, 256]}}, "scale.size=[8, 256]"),
    ({"scale": {"mpp": 0}}, "scale.mpp=0"),
    ({"scale": {"mpp": 1e9}}, "scale.mpp=1000000000.0"),
    ({"scale": [256, 256]}, "scale must be an object"),
    ({"config": {"filters": [512, 1024, 2048, 4096, 8192]}}, "got 4096"),
    ({"config": {"filters": [4]}}, "config.filters must list 2..8"),
    ({"config": {"filters": [4] * 9}}, "config.filters must list 2..8"),
    ({"config": {"filters": [4, "8"]}}, "got '8'"),
    ({"config": {"filters": [4, 8], "in_channels": 2}}, "config.in_channels=2"),
    ({"config": {"filters": [4, 8], "classes": 0}}, "config.classes=0"),
    ({"config": {"filters": [4, 8], "classes": 300}}, "config.classes=300"),
    ({"class_names": []}, "class_names must list"),
    ({"halo": -1}, "halo=-1"),
    ({"halo": 5000}, "halo=5000"),
    ({"tile": 1 << 20}, "tile=1048576"),
    ({"threshold": 1.5}, "threshold=1.5"),
])  # fmt: skip
def test_card_outside_sane_bounds_is_refused_when_read(tmp_path, change, named):
    path = write_card(tmp_path / "bad.safetensors", {**GOOD, **change})
    with pytest.raises(CheckpointError, match="bad.safetensors: model card") as info:
        read_card(path)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_good_card_and_shipped_cards_are_read(tmp_path):
    assert read_card(write_card(tmp_path / "good.safetensors", GOOD)).scale == {"size": [256, 256]}
    for name in ("lung-xray", "nuclei-he", "tissue-he"):
        assert read_card(resolve(name)).name == name


def test_card_with_huge_filters_is_refused_before_any_allocation(tmp_path):
    """filters up to 8192 built an 11.7 GB UNet++ before the weights were looked at."""
    card = {**GOOD, "arch": "unetpp", "config": {"filters": [512, 1024, 2048, 4096, 8192]}}
    path = write_card(tmp_path / "huge.safetensors", card)
    before = peak_rss_mb()
    with pytest.raises(CheckpointError, match="huge.safetensors: model card config.filters"):
        checkpoint.load(path)
    assert peak_rss_mb() - before < 500  # a sanity check: building it took 11.7 GB


def test_weights_that_do_not_fit_the_card_are_refused_before_the_model_is_built(tmp_path):
    """The card's model is built on the meta device and compared with the header's shapes:
    widths the card allows (2048 at every level of 8) with tiny weights allocate nothing."""
    big = {**GOOD, "arch": "unetpp", "config": {"in_channels": 1, "filters": [2048] * 8}}
    path = write_card(tmp_path / "wide.safetensors", big)
    before = peak_rss_mb()
    with pytest.raises(CheckpointError, match=r"wide.safetensors: unetpp .* parameters, more than"):
        checkpoint.load(path)
    assert peak_rss_mb() - before < 500  # the real model: 5.9e9 parameters, 23 GB

    torch.manual_seed(0)
    other = build_model("unet", in_channels=1, classes=1, filters=[8, 16, 32])
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    path = write_card(tmp_path / "shapes.safetensors", GOOD, state)  # the card says [4, 8, 16]
    with pytest.raises(CheckpointError, match=r"weights do not fit unet .* shapes \[") as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value)


def test_checkpoint_save_refuses_a_card_read_card_would_refuse(tmp_path):
    from pipeline.cards import ModelCard

    model = build_model("unet", in_channels=1, classes=1, filters=[4, 8])
    with pytest.raises(CheckpointError, match="halo=99999"):
        checkpoint.save(model, ModelCard(arch="", config={}, halo=99999), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# --- ingest of images decoded whole ------------------------------------------------------


def _spy_reads(image, monkeypatch) -> list[tuple[int, int]]:
    reads: list[tuple[int, int]] = []
    real = image.read_region

    def spy(level, y, x, h, w):
        reads.append((h, w))
        return real(level, y, x, h, w)

    monkeypatch.setattr(image, "read_region", spy)
    return reads


def test_resampling_in_bounded_reads_is_identical_to_one_read(tmp_path, monkeypatch):
    """A strong downsample makes every output depend on much of the source: read whole, an
    RGBA16 32768² PNG became a 16 GiB float32 copy. Sub-blocks give the very same floats."""
    pixels = np.random.default_rng(1).integers(0, 65535, (300, 260, 4)).astype(np.uint16)
    (tmp_path / "x.png").write_bytes(imagecodecs.png_encode(pixels))
    with open_image(tmp_path / "x.png") as image:
        whole = resize(image.read_region(0, 0, 0, 300, 260), (23, 19))
        reads = _spy_reads(image, monkeypatch)
        part = resample_block(image, 0, (23, 19), (0, 23), (0, 19), source_side=64)
    np.testing.assert_array_equal(part, whole)
    assert len(reads) > 4 and max(max(r) for r in reads) <= 64


def test_preview_of_an_image_decoded_whole_reads_it_chunk_by_chunk(tmp_path, monkeypatch):
    pixels = np.random.default_rng(2).integers(0, 255, (2100, 1500)).astype(np.uint8)
    PILImage.fromarray(pixels).save(tmp_path / "x.png", compress_level=1)
    with open_image(tmp_path / "x.png") as image:
        reads = _spy_reads(image, monkeypatch)
        small = preview(image)
    expected = pixels[:2100 // 3 * 3, :1500 // 3 * 3].reshape(700, 3, 500, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(small[..., 0], expected, rtol=1e-6)
    assert max(h * w for h, w in reads) <= 1024 * 1024


def test_mask_pieces_are_whole_chunks_of_the_tiles_own_box(tmp_path):
    """Invariant 1 for piece-wise delivery: the store refuses a piece outside the tile's
    full-res box, off the chunk grid, or of the wrong shape."""
    store = OutputStore.create_or_open(
        tmp_path / "s.zarr", image_id="s", full_hw=(120, 100), work_hw=(30, 25), tile=16, full_chunk=16,
        classes=["lung"], provenance={"input": {"path": "x"}, "model": {}, "run": {}},
    )  # fmt: skip
    (tile, *_) = plan_tiles((30, 25), 16)
    _, owned = store.owned_boxes(tile)
    assert owned == Box(0, 0, 64, 64)
    store.write_tile(tile, np.zeros((16, 16, 1), np.float32), None, owned)
    for piece in [Box(0, 0, 32, 32), Box(32, 48, 64, 64)]:
        store.write_mask_piece(tile, piece, np.ones(piece.shape, np.uint8))
    for bad in [Box(0, 0, 80, 32), Box(8, 0, 32, 32), Box(0, 0, 24, 32), Box(0, 0, 0, 0)]:
        with pytest.raises(StoreError, match="is not whole chunks of its own"):
            store.write_mask_piece(tile, bad, np.ones(bad.shape, np.uint8))
    with pytest.raises(StoreError, match="expected"):
        store.write_mask_piece(tile, Box(0, 32, 32, 64), np.ones((16, 32), np.uint8))
    mask = np.asarray(store.mask)
    assert mask[:32, :32].all() and mask[32:64, 48:64].all() and mask.sum() == 32 * 32 + 32 * 16
