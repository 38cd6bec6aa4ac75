"""Precision and pruning, in one process:
1. fp32 vs bf16 autocast (both channels_last) on the full-size UNet++ over the default crop
   window of the benchmark image: speed ratio (alternating rounds, best of each), mask
   agreement and max |Δprob| between the two;
2. the shipped lung model (pipeline/weights/lung-xray.safetensors) on its validation image
   (cxr-txrv/16747_3_1.jpg against the V7 Labs mask thresholded at 127): Dice and seconds of
   segment() for UNet++ accurate mode and prune levels L1..L4, at fp32 and at the default
   precision. Skipped, and said so, while the model or the image is absent.
Speed of the full-size UNet++ per prune level: benchmarks/prune_levels.py.

Usage: python benchmarks/precision.py [--size 2048] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REAL_DATA,
    as_segpipe_runs,
    cache_dir,
    in_worker_env,
    load,
    machine,
    table,
)
from benchmarks.overhead import tile_batches  # noqa: E402
from benchmarks.vs_monai import QUICK_FILTERS, prepare  # noqa: E402
from pipeline import cards  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.errors import SegpipeError  # noqa: E402
from pipeline.local import segment  # noqa: E402
from pipeline.models import checkpoint  # noqa: E402
from pipeline.store import OutputStore  # noqa: E402

LUNG_MODEL = ROOT / "pipeline/weights/lung-xray.safetensors"
LUNG_IMAGE = REAL_DATA / "cxr-txrv/16747_3_1.jpg"
LUNG_MASK = REAL_DATA / "cxr-txrv/16747_3_1_lungmask_v7labs.jpg"
MODES = (("accurate", None), ("fast", 1), ("fast", 2), ("fast", 3), ("fast", 4))


def forward(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> tuple[float, np.ndarray]:
    """Seconds and probabilities of one forward pass."""
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        probs = torch.sigmoid(model(x).float())
    return time.perf_counter() - start, probs.numpy()


def fp32_vs_bf16(size: int, tile: int, rounds: int, filters: tuple[int, ...] | None) -> str:
    setup, source = prepare(size, tile, 256, filters)
    pixels = np.asarray(Image.open(setup.image).convert("RGB"))
    model, _ = checkpoint.load(setup.model)
    model = as_segpipe_runs(model)
    x = tile_batches(pixels, RunConfig().with_(tile=tile), model.multiple)[0]
    forward(model, x, bf16=True)  # oneDNN builds its bf16 kernels on the first call
    times: dict[bool, list[float]] = {False: [], True: []}
    probs = {}
    for _ in range(rounds):
        for bf16 in (False, True):
            seconds, probs[bf16] = forward(model, x, bf16)
            times[bf16].append(seconds)
    fp32, bf16 = min(times[False]), min(times[True])
    agree = np.mean((probs[False] >= 0.5) == (probs[True] >= 0.5))
    delta = np.abs(probs[False] - probs[True]).max()
    shape = "x".join(map(str, x.shape))
    return "\n".join([
        f"### fp32 vs bf16: UNet++ {'[32..512]' if filters is None else list(filters)}, one crop window "
        f"{shape} of the {source}, channels_last, best of {rounds}\n",
        table(["precision", "seconds", "speed-up", "mask agreement with fp32", "max abs Δprob"], [
            ["fp32", f"{fp32:.2f}", "1.00x", "100%", "0"],
            ["bf16 autocast", f"{bf16:.2f}", f"{fp32 / bf16:.2f}x", f"{100 * agree:.3f}%", f"{delta:.1e}"],
        ]),
        "\nThe model is untrained, its head rescaled (logits centred, sd 4): many more of its pixels sit "
        "near the threshold than a trained model's, so expect a trained model to agree more; the lung "
        "model below gives a trained figure.",
    ])  # fmt: skip


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * np.logical_and(mask, truth).sum() / max(mask.sum() + truth.sum(), 1))


def lung_model_table() -> str:
    """Dice and seconds of segment() per mode and precision with the shipped lung model."""
    title = "### Lung model: prune levels and precision (Dice against the V7 Labs mask)\n"
    if not LUNG_MODEL.is_file():
        return title + f"\nNot measured: {LUNG_MODEL.relative_to(ROOT)} is not in this tree yet."
    if not (LUNG_IMAGE.is_file() and LUNG_MASK.is_file()):
        return title + f"\nNot measured: {LUNG_IMAGE} or its mask is absent (SEGPIPE_REAL_DATA)."
    card = cards.read_card(LUNG_MODEL)
    truth = np.asarray(Image.open(LUNG_MASK).convert("L")) > 127
    out = cache_dir() / "lung-runs"
    rows, seconds, masks = [], {}, {}
    segment(LUNG_IMAGE, LUNG_MODEL, out / "warm", exports=())  # imports and kernels, untimed
    for mode, level in MODES:
        row = [mode if level is None else f"fast L{level}"]
        for precision in ("fp32", "auto"):
            run_dir = out / f"{mode}-{level}-{precision}"
            shutil.rmtree(run_dir, ignore_errors=True)
            start = time.perf_counter()
            try:
                path = segment(LUNG_IMAGE, LUNG_MODEL, run_dir, mode=mode, prune_level=level,
                               precision=precision, exports=())
            except SegpipeError as exc:
                row += ["n/a", str(exc).splitlines()[0][:60]]
                continue
            seconds[(mode, level, precision)] = time.perf_counter() - start
            mask = masks[(mode, level, precision)] = np.asarray(OutputStore.open(path).mask[...]) > 0
            row += [f"{dice(mask, truth):.4f}", f"{seconds[(mode, level, precision)]:.2f}"]
        rows.append(row)
    return "\n".join([
        title,
        f"Model: {card.name or LUNG_MODEL.name}, {card.arch} {card.config.get('filters')}, card's mode "
        f"{card.config.get('mode')} (prune level {card.config.get('prune_level')}), scale {card.scale}; image "
        f"{LUNG_IMAGE.name} (seconds: segment() end to end, one run each).\n",
        table(["mode", "Dice fp32", "seconds fp32", "Dice default precision", "seconds default"], rows),
        "",
        *agreement(masks),
    ])


def agreement(masks: dict[tuple, np.ndarray]) -> list[str]:
    """Pixel agreement of each mode's fp32 and default-precision masks."""
    pairs = [(m, lv) for m, lv in MODES if (m, lv, "fp32") in masks and (m, lv, "auto") in masks]
    return ["Mask agreement, fp32 vs default precision: " + ", ".join(
        f"{m if lv is None else f'L{lv}'} {100 * np.mean(masks[(m, lv, 'fp32')] == masks[(m, lv, 'auto')]):.3f}%"
        for m, lv in pairs)] if pairs else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small UNet++ on a 512² image, one round")
    args = parser.parse_args()
    in_worker_env()
    if args.quick:
        args.size, args.tile, args.rounds = 512, 256, 1
    print(f"## Precision and pruning\n\nMachine: {machine()}\n")
    print(fp32_vs_bf16(args.size, args.tile, args.rounds, QUICK_FILTERS if args.quick else None))
    print()
    print(lung_model_table())
    print(f"\nLoad average at the end: {load()}")


if __name__ == "__main__":
    main()
