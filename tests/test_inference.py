"""The tiled engine: exact against whole-image inference, gaussian blending, working scale,
tissue skipping, precision. Tiny models with fixed random weights and randomised BN."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine import process_env, tiling
from pipeline.engine.predictor import Predictor, autocast_dtype, cpu_has_fast_bf16
from pipeline.engine.stitching import deliver_full_res, to_labels, upsample_region
from pipeline.engine.tiling import Box, gaussian_importance, gaussian_windows
from pipeline.errors import InputError
from pipeline.io import open_image, resize
from pipeline.local import segment
from pipeline.models import build_model, checkpoint
from pipeline.store import OutputStore
from tests.io_fixtures import write_svs_like
from tests.reference_nets import randomise_bn

FILTERS = [4, 8, 16, 32, 64]
EXACT = {"precision": "fp32", "prob_dtype": "float32", "exports": ()}


def tiny(arch: str, in_channels: int = 3, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_bn(build_model(arch, in_channels=in_channels, classes=1, filters=FILTERS, **config))


def save(model, path, **card) -> str:
    checkpoint.save(model, ModelCard(arch="", config={}, **card), path)
    return str(path)


def write_png(path, shape, seed=0) -> np.ndarray:
    """A smooth random RGB image (structure at several scales, so outputs vary)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0] // 16 + 2, shape[1] // 16 + 2, 3)).astype(np.float32)
    smooth = resize(coarse, shape) * 200 + rng.random((*shape, 3)) * 55
    pixels = np.clip(smooth, 0, 255).astype(np.uint8)
    PILImage.fromarray(pixels).save(path)
    return pixels


def split_threshold(probs: np.ndarray, margin: float = 2e-5) -> float:
    """A threshold near the median that no pixel lies within float noise of, so masks can be
    compared exactly (tiling reorders float sums: ~1e-7 differences are expected)."""
    values = np.sort(probs.ravel())
    gaps = np.flatnonzero(np.diff(values) > 2 * margin)
    best = gaps[np.argmin(np.abs(gaps - values.size // 2))]
    return float((values[best] + values[best + 1]) / 2)


def whole_image_probs(model, pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        return torch.sigmoid(model(x))[0, 0].numpy()


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
@pytest.mark.parametrize("shape", [(1000, 1300), (517, 781)])
def test_crop_tiling_equals_whole_image_inference(tmp_path, arch, shape):
    pixels = write_png(tmp_path / "img.png", shape)
    model = tiny(arch)
    expected = whole_image_probs(model, pixels)
    threshold = split_threshold(expected)
    out = segment(tmp_path / "img.png", save(model, tmp_path / "m.safetensors"), tmp_path / "out",
                  tile=256, halo=64, threshold=threshold, **EXACT)
    store = OutputStore.open(out)
    assert store.state == "complete"
    probs = store.read_prob()[..., 0]
    assert np.abs(probs - expected).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(store.mask), (expected >= threshold).astype(np.uint8))


def test_reference_align_corners_flag_is_close(tmp_path):
    pixels = write_png(tmp_path / "img.png", (600, 700))
    model = tiny("unet", bilinear=True, align_corners=True)
    expected = whole_image_probs(model, pixels)
    out = segment(tmp_path / "img.png", save(model, tmp_path / "m.safetensors"), tmp_path / "out",
                  tile=256, halo=64, **EXACT)
    assert np.abs(OutputStore.open(out).read_prob()[..., 0] - expected).max() <= 1e-4


def test_windows_split_by_max_window_stay_exact(tmp_path):
    pixels = write_png(tmp_path / "img.png", (400, 520))
    model = tiny("unetpp")
    out = segment(tmp_path / "img.png", save(model, tmp_path / "m.safetensors"), tmp_path / "out",
                  tile=512, halo=64, max_window=256, **EXACT)
    assert np.abs(OutputStore.open(out).read_prob()[..., 0] - whole_image_probs(model, pixels)).max() <= 1e-5


def global_sliding_window(model, pixels, window, overlap):
    """The textbook loop: every window of the global grid, Σ w·p / Σ w over the image."""
    h, w, _ = pixels.shape
    num, den = np.zeros((h, w), np.float64), np.zeros((h, w), np.float64)
    for box in gaussian_windows((h, w), window, overlap):
        p = whole_image_probs(model, pixels[box.slices()])
        weight = gaussian_importance(box.shape)
        num[box.slices()] += weight * p
        den[box.slices()] += weight
    return num / den


@pytest.mark.parametrize("tile", [128, 256, 384])
def test_gaussian_blend_equals_global_sliding_window(tmp_path, tile):
    pixels = write_png(tmp_path / "img.png", (430, 500))
    model = tiny("unet")
    expected = global_sliding_window(model, pixels, 160, 0.25)
    out = segment(tmp_path / "img.png", save(model, tmp_path / "m.safetensors"), tmp_path / "out",
                  tile=tile, blend="gaussian", window=160, overlap=0.25, **EXACT)
    assert np.abs(OutputStore.open(out).read_prob()[..., 0] - expected).max() <= 1e-5


def test_xray_at_model_scale_gives_full_resolution_mask(tmp_path):
    rng = np.random.default_rng(1)
    grey = (resize(rng.random((40, 40, 1)).astype(np.float32), (2000, 2000)) * 60000).astype(np.uint16)
    PILImage.fromarray(grey[..., 0]).save(tmp_path / "cxr.png")
    model = tiny("unetpp", in_channels=1)
    path = save(model, tmp_path / "m.safetensors", scale={"size": [512, 512]},
                normalization={"kind": "percentile", "low": 1, "high": 99})
    out = segment(tmp_path / "cxr.png", path, tmp_path / "out", tile=256, **EXACT)
    store = OutputStore.open(out)
    assert store.mask.shape == (2000, 2000)
    assert store.prob.shape[1:] == (512, 512)
    # The same pipeline by hand on the whole image: resize, normalise, infer, upsample.
    small = resize(grey, (512, 512))
    job_stats = store.provenance["input"]
    assert job_stats["image"]["levels"][0][:2] == [2000, 2000]
    probs = store.read_prob()[..., 0]
    full = F.interpolate(torch.from_numpy(probs)[None, None], size=(2000, 2000), mode="bilinear",
                         align_corners=False)[0, 0].numpy()
    agreement = (np.asarray(store.mask) == (full >= 0.5)).mean()
    assert agreement >= 0.9999
    assert small.shape == (512, 512, 1)


@pytest.mark.parametrize("classes", [1, 3])
def test_delivery_in_pieces_equals_the_whole_box(monkeypatch, classes):
    rng = np.random.default_rng(7)
    work_hw, full_hw = (64, 48), (1000, 777)
    probs = rng.random((*work_hw, classes)).astype(np.float32)
    region, full = Box(0, 0, *work_hw), Box(0, 0, *full_hw)
    whole = to_labels(upsample_region(probs, region, full, work_hw, full_hw), 0.5)
    monkeypatch.setattr(tiling, "MAX_FULL_CHUNK", 300)  # pieces of 3x3 chunks of 100
    pieces = list(deliver_full_res(probs, region, full, work_hw, full_hw, 100, 0.5))
    assert len(pieces) == 4 * 3 and max(max(p.shape) for p, _ in pieces) == 300
    delivered = np.full(full_hw, 255, np.uint8)
    for piece, labels in pieces:
        delivered[piece.slices()] = labels
    np.testing.assert_array_equal(delivered, whole)


def test_xray_mask_delivered_in_pieces_equals_the_whole_box_delivery(tmp_path, monkeypatch):
    """Work 64², full 1000²: the one tile owns the whole full-resolution mask. Delivered in
    one piece (chunk 1000), then in 16 pieces (chunks bounded to 256), the mask is the same,
    and is exactly the stored probabilities upsampled whole and thresholded."""
    rng = np.random.default_rng(8)
    grey = (resize(rng.random((12, 12, 1)).astype(np.float32), (1000, 1000)) * 255).astype(np.uint8)
    PILImage.fromarray(grey[..., 0]).save(tmp_path / "cxr.png")
    path = save(tiny("unet", in_channels=1), tmp_path / "m.safetensors", scale={"size": [64, 64]})
    one = OutputStore.open(segment(tmp_path / "cxr.png", path, tmp_path / "one", tile=64, **EXACT))
    assert one.layout.full_chunk == 1000
    up = upsample_region(one.read_prob(), Box(0, 0, 64, 64), Box(0, 0, 1000, 1000), (64, 64), (1000, 1000))
    np.testing.assert_array_equal(np.asarray(one.mask), to_labels(up, 0.5))
    threshold = float(np.median(up))  # both labels, plenty of boundary
    monkeypatch.setattr(tiling, "MAX_FULL_CHUNK", 256)
    out = segment(tmp_path / "cxr.png", path, tmp_path / "pieces", tile=64, threshold=threshold, **EXACT)
    pieces = OutputStore.open(out)
    assert pieces.layout.full_chunk == 256 and pieces.mask.chunks == (256, 256)
    np.testing.assert_array_equal(pieces.read_prob(), one.read_prob())
    np.testing.assert_array_equal(np.asarray(pieces.mask), to_labels(up, threshold))


def test_slide_model_reads_the_level_at_its_scale(tmp_path):
    rng = np.random.default_rng(2)
    level0 = np.clip(resize(rng.random((20, 24, 3)).astype(np.float32), (1024, 1280)) * 255, 0, 255)
    path = write_svs_like(tmp_path / "slide.svs", level0.astype(np.uint8), mpp=0.25)
    model = tiny("unet")
    out = segment(path, save(model, tmp_path / "m.safetensors", scale={"mpp": 0.5}), tmp_path / "out",
                  tile=256, tissue=False, **EXACT)
    store = OutputStore.open(out)
    assert store.provenance["input"]["level"] == 1
    assert store.prob.shape[1:] == (512, 640)
    assert store.mask.shape == (1024, 1280)
    assert store.state == "complete"


def write_tiled_slide(path, tissue_tiles, grid=(6, 8), tile=128) -> np.ndarray:
    """A white slide whose tissue fills exactly the given tiles (pink, textured)."""
    rng = np.random.default_rng(3)
    h, w = grid[0] * tile, grid[1] * tile
    pixels = np.full((h, w, 3), 245, np.uint8)
    for r, c in tissue_tiles:
        patch = np.stack([200 + rng.integers(0, 40, (tile, tile)), 60 + rng.integers(0, 60, (tile, tile)),
                          150 + rng.integers(0, 60, (tile, tile))], axis=-1)
        pixels[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = patch
    tifffile.imwrite(path, pixels, tile=(128, 128), photometric="rgb", compression="zlib")
    return pixels


def test_tissue_skipping_skips_exactly_the_background_tiles(tmp_path):
    rng = np.random.default_rng(4)
    cells = [(r, c) for r in range(6) for c in range(8)]
    tissue = {cells[i] for i in rng.choice(len(cells), size=14, replace=False)}  # ~30%
    write_tiled_slide(tmp_path / "slide.tif", tissue)
    model = tiny("unet")
    out = segment(tmp_path / "slide.tif", save(model, tmp_path / "m.safetensors"), tmp_path / "out",
                  tile=128, tissue_threshold=0.5, threshold=0.0, **EXACT)
    store = OutputStore.open(out)
    grid = store.status_grid()
    done = {(int(r), int(c)) for r, c in np.argwhere(grid == 1)}
    skipped = {(int(r), int(c)) for r, c in np.argwhere(grid == 2)}
    assert done == tissue
    assert skipped == set(cells) - tissue
    mask = np.asarray(store.mask)
    for r, c in skipped:  # skipped tiles stay background; done ones got threshold-0 labels
        assert not mask[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128].any()
    assert store.state == "complete"


def discs(rng, n, size):
    """Images of bright discs on a noisy dark background, and their masks."""
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(2, 6)):
            cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 16, size // 6))]
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = np.where(mask, 170, 70) + rng.normal(0, 25, mask.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def test_bf16_agrees_with_fp32_on_a_trained_model(tmp_path):
    """A briefly trained model has confident outputs, as a real one does; bf16 autocast
    must then give the same mask for >= 99.9% of pixels."""
    rng = np.random.default_rng(6)
    torch.manual_seed(6)
    model = build_model("unet", in_channels=1, classes=1, filters=[8, 16, 32])
    optimiser = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(80):
        images, masks = discs(rng, 8, 64)
        x = torch.from_numpy(images[:, None] / np.float32(255))
        loss = F.binary_cross_entropy_with_logits(model(x), torch.from_numpy(masks[:, None]).float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    image, _ = discs(rng, 1, 512)
    PILImage.fromarray(image[0]).save(tmp_path / "img.png")
    path = save(model.eval(), tmp_path / "m.safetensors")
    masks = {}
    for precision in ("fp32", "bf16"):
        out = segment(tmp_path / "img.png", path, tmp_path / precision, tile=256, precision=precision,
                      exports=())
        masks[precision] = np.asarray(OutputStore.open(out).mask)
    assert 0.05 < masks["fp32"].mean() < 0.95  # the model found discs, not a constant
    assert (masks["fp32"] == masks["bf16"]).mean() >= 0.999


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert autocast_dtype("fp32", cpu) is None


def test_flip_tta_averages_flipped_predictions():
    model = tiny("unet")
    x = np.random.default_rng(5).random((2, 48, 64, 3)).astype(np.float32)
    plain = Predictor(model, RunConfig(precision="fp32"))(x)
    tta = Predictor(model, RunConfig(precision="fp32", tta=True))(x)
    flipped_w = Predictor(model, RunConfig(precision="fp32"))(x[:, :, ::-1].copy())[:, :, ::-1]
    flipped_h = Predictor(model, RunConfig(precision="fp32"))(x[:, ::-1].copy())[:, ::-1]
    np.testing.assert_allclose(tta, (plain + flipped_w + flipped_h) / 3, atol=1e-6)


# In a fresh interpreter: is a 100 MB tensor, allocated and freed in a thread started
# after the setting (as a tile thread is), carved from the reusable heap or a fresh mmap?
HEAP_PROBE = textwrap.dedent("""
    import sys, threading, torch
    from pipeline.engine import process_env
    applied = process_env.keep_freed_buffers() if sys.argv[1] == "on" else False
    found = []
    def probe():
        t = torch.ones(100 << 20, dtype=torch.uint8)
        heap = [line.split()[0] for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
        lo, hi = (int(v, 16) for v in heap[0].split("-")) if heap else (0, 0)
        found.append(lo <= t.data_ptr() < hi)
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    print(applied, found[0])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
def test_cpu_inference_keeps_large_freed_buffers_on_the_heap(monkeypatch):
    def probe(mode: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True,
                             env=env, check=True)
        return out.stdout.split()

    assert probe("off") == ["False", "False"]  # glibc's default: a mmap, unmapped on free
    assert probe("on") == ["True", "True"]
    # Ray tile workers get the settings at process start; a user's own are kept.
    for name in process_env.WORKER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert process_env.worker_env() == process_env.WORKER_ENV
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    assert "GLIBC_TUNABLES" not in process_env.worker_env()


def test_corrupt_input_is_one_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    model = tiny("unet")
    with pytest.raises(InputError, match="bad.png") as info:
        segment(tmp_path / "bad.png", save(model, tmp_path / "m.safetensors"), tmp_path / "out", **EXACT)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError):
        open_image(tmp_path / "bad.png")


def test_rerun_of_a_complete_image_changes_nothing(tmp_path):
    write_png(tmp_path / "img.png", (300, 300))
    path = save(tiny("unet"), tmp_path / "m.safetensors")
    out = segment(tmp_path / "img.png", path, tmp_path / "out", tile=128, **EXACT)
    chunks = [out / "prob" / "0" / "c", out / "labels" / "mask" / "0" / "c", out / "0" / "c"]
    before = {p: p.stat().st_mtime_ns for c in chunks for p in c.rglob("*") if p.is_file()}
    segment(tmp_path / "img.png", path, tmp_path / "out", tile=128, **EXACT)
    after = {p: p.stat().st_mtime_ns for c in chunks for p in c.rglob("*") if p.is_file()}
    assert before == after and len(before) >= 3  # prob, mask and picture chunks, untouched


def test_segment_keeps_the_model_loaded_across_calls_and_reloads_a_rewritten_one(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    from pipeline.models import checkpoint
    from pipeline.store import OutputStore

    loads = []
    real = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint, model)
    images = []
    for i in range(3):
        images.append(tmp_path / f"x{i}.png")
        PILImage.fromarray(np.random.default_rng(i).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(images[-1])

    first = [segment(p, model, tmp_path / "out", tile=32, exports=()) for p in images]
    assert len(loads) == 1  # loaded once, for three images (it was once per image)

    again = segment(images[0], model, tmp_path / "out", tile=32, exports=(), overwrite=True, tta=True)
    assert len(loads) == 2  # other settings: another model instance
    assert OutputStore.open(again).state == "complete"  # the replaced store, not a stale handle

    os.utime(model, ns=(0, 0))  # the checkpoint rewritten (here: only its modification time)
    segment(images[1], model, tmp_path / "out2", tile=32, exports=())
    assert len(loads) == 3
    assert [OutputStore.open(p).state for p in first] == ["complete"] * 3
