"""segpipe vs MONAI `sliding_window_inference` on one RGB image, same model and weights.

Every configuration runs in a fresh process (its own peak RSS) and is compared with
whole-image inference in fp32, the exact answer (computed once and cached as .npy):
seconds, speed-up over MONAI, peak RSS, max |Δprob| and mask agreement (threshold 0.5).

The configurations the goals rest on run --rounds times, interleaved; the fastest run counts.
MONAI is timed on its core call alone, on a tensor already in memory; segpipe is timed end
to end (read the PNG, load the checkpoint, infer, stitch, write zarr, pyramid).
Precisions: fp32 (MONAI as usually run, NCHW; also channels_last), and each side's best:
bf16 autocast + channels_last (MONAI wrapped in torch.autocast here; segpipe's default
precision "auto" picks bf16 on a CPU with AMX / AVX512-BF16, else fp32).
Environments: MONAI runs in the one this script was started in, with the model as loaded,
as its users run it; segpipe in the one its Ray tile workers start with (pipeline.engine.process_env:
glibc keeps freed buffers, OpenMP waits passively), with BatchNorm folded into the convs as
its predictor does, so `segment()` here computes as a default run's workers do, without
Ray's start-up. One more row gives MONAI both of those too.

Usage: python benchmarks/vs_monai.py [--size 2048] [--tile 1024] [--window 256] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    bench_image,
    cache_dir,
    goal,
    load,
    machine,
    peak_rss_mb,
    run_one,
    table,
    unetpp_model,
)

QUICK_FILTERS = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Setup:
    """The shared inputs of one run: image, checkpoint, exact answer, and the geometry."""

    image: str  # RGB PNG
    model: str
    reference: str  # whole-image fp32 probabilities, (H, W) float32 .npy
    tile: int
    window: int
    halo: int = 64
    overlap: float = 0.25
    sw_batch: int = 4


@dataclass(frozen=True)
class Config:
    name: str
    side: str  # "monai" | "segpipe"
    precision: str  # "fp32" | "fp32-cl" (MONAI, channels_last) | "bf16" (MONAI) | "auto"
    roi: str = ""  # MONAI: "window" | "tile"
    blend: str = "crop"  # segpipe
    decides: bool = False  # a goal rests on it: timed in every round
    # MONAI given what segpipe gives its own model: the worker environment
    # (pipeline.engine.process_env) and BatchNorm folded into the convs (pipeline.models.folding)
    segpipe_settings: bool = False


def configs(s: Setup, quick: bool) -> list[Config]:
    """MONAI at its common setting and with tile-sized windows; segpipe crop and gaussian;
    each at fp32 and at its best precision, interleaved so drifting load hits both sides.
    Quick: MONAI's common setting and segpipe's default blend only."""
    monai_w, monai_t = f"MONAI roi {s.window}", f"MONAI roi {s.tile}"
    crop, gauss = f"segpipe crop {s.tile}+{s.halo}", f"segpipe gaussian {s.window}"
    if quick:
        return [Config(monai_w, "monai", "fp32", roi="window", decides=True),
                Config(crop, "segpipe", "fp32", decides=True),
                Config(monai_w, "monai", "bf16", roi="window", decides=True),
                Config(crop, "segpipe", "auto", decides=True)]
    return [
        Config(monai_w, "monai", "fp32", roi="window", decides=True),
        Config(crop, "segpipe", "fp32", decides=True),
        Config(monai_w, "monai", "fp32-cl", roi="window", decides=True),
        Config(gauss, "segpipe", "fp32", blend="gaussian"),
        Config(monai_t, "monai", "fp32", roi="tile"),
        Config(monai_w, "monai", "bf16", roi="window", decides=True),
        Config(crop, "segpipe", "auto", decides=True),
        Config(gauss, "segpipe", "auto", blend="gaussian"),
        Config(monai_t, "monai", "bf16", roi="tile"),
        Config(f"{monai_w}, with segpipe's worker settings", "monai", "bf16", roi="window", segpipe_settings=True),
    ]


# ---------------------------------------------------------------------------------------
# In the child process: one configuration


def measure(config: Config, setup: Setup, workdir: Path) -> dict:
    """Run one configuration, then compare its probabilities with the exact answer."""
    run = run_monai if config.side == "monai" else run_segpipe
    seconds, probs, precision = run(config, setup, workdir)
    rss = peak_rss_mb()
    exact = np.load(setup.reference)
    delta = np.abs(probs - exact)
    agree = float(np.mean((probs >= 0.5) == (exact >= 0.5)))
    return {**asdict(config), "seconds": seconds, "peak_rss_mb": rss, "max_delta": float(delta.max()),
            "mean_delta": float(delta.mean()), "mask_agreement": agree, "ran_at": precision}


def run_monai(config: Config, setup: Setup, workdir: Path) -> tuple[float, np.ndarray, str]:
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.models import checkpoint, fold_batchnorm

    model, _ = checkpoint.load(setup.model)
    if config.segpipe_settings:
        model = fold_batchnorm(model)
    x = image_tensor(setup.image)
    channels_last = config.precision in ("fp32-cl", "bf16")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    roi = setup.window if config.roi == "window" else setup.tile
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
        logits = sliding_window_inference(x, roi, setup.sw_batch, model, overlap=setup.overlap,
                                          mode="gaussian")
        probs = torch.sigmoid(logits.float())[0, 0].numpy()
    seconds = time.perf_counter() - start
    return seconds, probs, config.precision


def run_segpipe(config: Config, setup: Setup, workdir: Path) -> tuple[float, np.ndarray, str]:
    import torch

    from pipeline.engine.predictor import autocast_dtype
    from pipeline.local import segment
    from pipeline.store import OutputStore

    out = workdir / f"out-{config.blend}-{config.precision}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    path = segment(setup.image, setup.model, out, tile=setup.tile, halo=setup.halo, blend=config.blend,
                   window=setup.window, overlap=setup.overlap, precision=config.precision,
                   prob_dtype="float32", exports=())
    seconds = time.perf_counter() - start
    probs = np.asarray(OutputStore.open(path).read_prob())[..., 0].astype(np.float32)
    dtype = autocast_dtype(config.precision, torch.device("cpu"))
    return seconds, probs, "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def image_tensor(png: str):
    """The PNG as a (1, 3, H, W) float32 tensor scaled to [0, 1], as the model card says."""
    import torch
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def reference(setup: Setup) -> dict:
    """Whole-image fp32 inference (the exact answer), saved to setup.reference."""
    import torch

    from pipeline.models import checkpoint

    model, _ = checkpoint.load(setup.model)
    x = image_tensor(setup.image)
    start = time.perf_counter()
    with torch.inference_mode():
        probs = torch.sigmoid(model(x))[0, 0].numpy()
    seconds = time.perf_counter() - start
    np.save(setup.reference, probs)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------
# In the parent process: prepare, run every configuration, report


def prepare(size: int, tile: int, window: int, filters: tuple[int, ...] | None) -> tuple[Setup, str]:
    """Image, checkpoint and exact answer in the cache directory (made once)."""
    from PIL import Image

    from pipeline.cards import read_card

    tag = f"{size}-" + ("full" if filters is None else "-".join(map(str, filters)))
    cache = cache_dir()
    pixels, source = bench_image(size)
    image = cache / f"image-{size}.png"
    if not image.exists():
        Image.fromarray(pixels).save(image)
    model = cache / f"unetpp-{tag}.safetensors"
    if not model.exists():
        c = min(size, 512)
        o = (size - c) // 2
        unetpp_model(model, pixels[o : o + c, o : o + c], filters)
    sha = read_card(model).weights_sha256[:12]
    setup = Setup(str(image), str(model), str(cache / f"exact-{tag}-{sha}.npy"), tile, window)
    return setup, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration a goal rests on")
    parser.add_argument("--quick", action="store_true", help="512² image, small UNet++, one round: a smoke run")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        setup = Setup(**spec["setup"])
        if spec["config"] is None:
            result = reference(setup)
        else:
            result = measure(Config(**spec["config"]), setup, Path(spec["workdir"]))
        print(json.dumps(result))
        return
    if importlib.util.find_spec("monai") is None:
        sys.exit("## vs MONAI\n\nNot measured: MONAI is not installed (pip install -e '.[bench]').")
    if args.quick:
        args.size, args.tile, args.window = 512, 256, 128
    filters = QUICK_FILTERS if args.quick else None
    setup, source = prepare(args.size, args.tile, args.window, filters)
    print(f"## vs MONAI: {source}, UNet++ {'[32..512]' if filters is None else list(filters)}, untrained "
          f"(seed 0, head centred)\n\nMachine: {machine()}\n")
    workdir = cache_dir() / "vs-monai-runs"
    workdir.mkdir(exist_ok=True)
    facts = Path(setup.reference).with_suffix(".json")
    if Path(setup.reference).exists() and facts.exists():
        exact = {**json.loads(facts.read_text()), "cached": True}
    else:
        exact = run_one(__file__, ["--one", json.dumps({"setup": asdict(setup), "config": None})])
        facts.write_text(json.dumps(exact))
    runs: dict[Config, list[dict]] = {}
    for round_ in range(1 if args.quick else args.rounds):
        for config in configs(setup, args.quick):
            if round_ == 0 or config.decides:
                spec = {"setup": asdict(setup), "config": asdict(config), "workdir": str(workdir)}
                worker_env = config.side == "segpipe" or config.segpipe_settings
                result = run_one(__file__, ["--one", json.dumps(spec)], worker_env=worker_env)
                runs.setdefault(config, []).append(result)
                print(f"  {config.name}, {config.precision}: {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    print(report([best_of(results) for results in runs.values()], exact, setup, judge=not args.quick))
    print(f"\nLoad average at the end: {load()}")


def best_of(results: list[dict]) -> dict:
    """One configuration's runs: the fastest run's figures, every run's seconds, the highest RSS."""
    best = min(results, key=lambda r: r["seconds"])
    return {**best, "all_seconds": [r["seconds"] for r in results],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}


def report(rows: list[dict], exact: dict, setup: Setup, judge: bool) -> str:
    base = {r["precision"]: r["seconds"] for r in rows
            if r["side"] == "monai" and r["roi"] == "window" and not r["segpipe_settings"]}
    lines = []
    header = ["configuration", "precision", "seconds (best)", "runs", f"vs MONAI roi {setup.window} fp32",
              "peak RSS MB", "max abs Δprob", "mean abs Δprob", "mask agreement"]
    body = [[r["name"], precision_label(r), f"{r['seconds']:.1f}", " ".join(f"{t:.1f}" for t in r["all_seconds"]),
             f"{base['fp32'] / r['seconds']:.2f}x",
             f"{r['peak_rss_mb']:.0f}", f"{r['max_delta']:.1e}", f"{r['mean_delta']:.1e}",
             f"{100 * r['mask_agreement']:.4f}%"] for r in rows]
    name = "whole image (exact answer)" + (", from an earlier run" if exact.get("cached") else "")
    body.insert(0, [name, "fp32", f"{exact['seconds']:.1f}", "1", f"{base['fp32'] / exact['seconds']:.2f}x",
                    f"{exact['peak_rss_mb']:.0f}", "0", "0", "100%"])
    lines.append(table(header, body))
    lines.append(f"\nMONAI: gaussian blend, overlap {setup.overlap}, sw_batch_size {setup.sw_batch}; "
                 f"segpipe: tile {setup.tile}, halo {setup.halo}, gaussian window {setup.window} "
                 f"overlap {setup.overlap}. Probabilities stored as float32 for the comparison.\n")
    lines += goals(rows) if judge else ["Quick run, a smoke test: the goals are judged at the full size only."]
    return "\n".join(lines)


def precision_label(row: dict) -> str:
    if row["side"] == "segpipe":
        return row["precision"] if row["precision"] == "fp32" else f"auto ({row['ran_at']})"
    return {"fp32": "fp32", "fp32-cl": "fp32 channels_last", "bf16": "bf16 channels_last"}[row["precision"]]


def goals(rows: list[dict]) -> list[str]:
    def pick(side: str, precision: str, roi_or_blend: str) -> dict | None:
        key = "roi" if side == "monai" else "blend"
        return next((r for r in rows if r["side"] == side and r["precision"] == precision
                     and r[key] == roi_or_blend and not r["segpipe_settings"]), None)

    monai_fp32 = pick("monai", "fp32", "window")
    monai_cl = pick("monai", "fp32-cl", "window") or monai_fp32
    monai_bf16 = pick("monai", "bf16", "window")
    monai_given = next((r for r in rows if r["segpipe_settings"]), None)
    crop_fp32, crop_auto = pick("segpipe", "fp32", "crop"), pick("segpipe", "auto", "crop")
    equal_fp32 = min(monai_fp32["seconds"], monai_cl["seconds"]) / crop_fp32["seconds"]
    equal_best = monai_bf16["seconds"] / crop_auto["seconds"]
    default = monai_fp32["seconds"] / crop_auto["seconds"]
    closer = crop_auto["max_delta"] < monai_bf16["max_delta"] and crop_fp32["max_delta"] < monai_fp32["max_delta"]
    same = crop_auto["ran_at"] == "bfloat16"
    lines = [
        goal("segpipe (crop) >= 1.5x faster than MONAI at equal precision, fp32 (vs MONAI's faster "
             "of NCHW and channels_last)", equal_fp32 >= 1.5, f"{equal_fp32:.2f}x"),
        goal("segpipe (crop) >= 1.5x faster than MONAI at equal precision, bf16 autocast + channels_last",
             same and equal_best >= 1.5, f"{equal_best:.2f}x" + ("" if same else ", segpipe ran fp32")),
        goal("segpipe with its default precision >= 4x faster than MONAI as usually run (fp32)",
             default >= 4, f"{default:.2f}x"),
        goal("segpipe's max abs Δprob to whole-image inference smaller than MONAI's at the same precision",
             closer, f"fp32 {crop_fp32['max_delta']:.1e} vs {monai_fp32['max_delta']:.1e}, "
             f"bf16 {crop_auto['max_delta']:.1e} vs {monai_bf16['max_delta']:.1e}"),
    ]
    if monai_given is not None:
        ratio = monai_given["seconds"] / crop_auto["seconds"]
        lines.append(f"- Not a goal: MONAI bf16 given segpipe's worker settings (pipeline/process_env.py, "
                     f"BatchNorm folded) took {monai_given['seconds']:.1f} s; segpipe's default is {ratio:.2f}x "
                     "faster than that.")
    return lines

if __name__ == "__main__":
    main()
