"""segpipe's overhead over the bare model: `segment()` end to end (read the image, normalise,
infer, stitch, write zarr, build the pyramid) against the model's forward alone over exactly
the same windows (tiling.crop_windows of every tile, batched per tile as segpipe batches
them), with the same precision, memory format and folded BatchNorm, on tensors already in
memory.

The model's kernels are warmed up on one window, then the two are timed alternately; the best
of the rounds counts. With --stages a last run calls the stages one by one, as segment()
does, to show where the time goes.

Usage: python benchmarks/overhead.py [--size 2048] [--rounds 2] [--precision auto] [--stages] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    as_segpipe_runs,
    cache_dir,
    goal,
    in_worker_env,
    load,
    machine,
    table,
)
from benchmarks.vs_monai import QUICK_FILTERS, prepare  # noqa: E402
from pipeline import stages  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.engine.predictor import autocast_dtype  # noqa: E402
from pipeline.engine.tiling import crop_windows, effective_halo, plan_tiles  # noqa: E402
from pipeline.local import segment  # noqa: E402
from pipeline.models import checkpoint  # noqa: E402

DEFAULT_HALO = 64


def tile_batches(pixels: np.ndarray, run: RunConfig, multiple: int) -> list[torch.Tensor]:
    """The model inputs segpipe's crop blend computes for this image: per tile, its windows
    normalised (/255, as the model card says), stacked in batches of run.batch_size."""
    hw = pixels.shape[:2]
    halo = effective_halo(run.halo if run.halo is not None else DEFAULT_HALO, multiple)
    batches = []
    for tile in plan_tiles(hw, run.tile):
        windows = crop_windows(tile, hw, halo, multiple, run.max_window)
        stack = np.stack([pixels[w.input.slices()] for w in windows]).astype(np.float32) / 255
        x = torch.from_numpy(stack).permute(0, 3, 1, 2)  # NHWC memory: channels_last already
        batches += list(torch.split(x, run.batch_size))
    return batches


def bare_seconds(model: torch.nn.Module, batches: list[torch.Tensor], dtype: torch.dtype | None) -> float:
    """The model's forward (and sigmoid) over every batch, nothing else."""
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for x in batches:
            torch.sigmoid(model(x).float())
    return time.perf_counter() - start


def segment_seconds(image: str, model: str, out: Path, run: RunConfig) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    segment(image, model, out, tile=run.tile, precision=run.precision, exports=())
    return time.perf_counter() - start


def stage_seconds(image: str, model: str, out: Path, run: RunConfig) -> dict[str, float]:
    """The stages of segment() one by one (exports off)."""
    shutil.rmtree(out, ignore_errors=True)
    times, start = {}, time.perf_counter()
    job = stages.ingest(image, model, run, str(out))
    times["ingest (read PNG, zarr work array, preview)"] = time.perf_counter() - start
    for name, step in (("plan", lambda: stages.plan(job, run)),
                       ("infer (tiles: read, normalise, model, stitch, write)",
                        lambda: _infer_local(job, model, run)),
                       ("finalize (status, pyramid)", lambda: stages.finalize(job))):
        start = time.perf_counter()
        step()
        times[name] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", action="store_true", help="time the stages in one more run")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--quick", action="store_true", help="512² image, small UNet++")
    args = parser.parse_args()
    in_worker_env()  # both sides: the environment of segpipe's tile workers
    if args.quick:
        args.size, args.tile = 512, 256
    setup, source = prepare(args.size, args.tile, 256, QUICK_FILTERS if args.quick else None)
    run = RunConfig().with_(tile=args.tile, precision=args.precision, exports=())
    from PIL import Image

    pixels = np.asarray(Image.open(setup.image).convert("RGB"))
    model, _ = checkpoint.load(setup.model)
    model = as_segpipe_runs(model)
    dtype = autocast_dtype(run.precision, torch.device("cpu"))
    batches = tile_batches(pixels, run, model.multiple)
    out = cache_dir() / "overhead-run"

    print(f"## Overhead over the bare model: {source}, "
          f"UNet++ {'[32..512]' if not args.quick else list(QUICK_FILTERS)}, precision {args.precision} "
          f"({'fp32' if dtype is None else dtype}), channels_last\n\nMachine: {machine()}\n")
    bare_seconds(model, batches[:1], dtype)
    bare, piped = [], []
    for _ in range(args.rounds):
        bare.append(bare_seconds(model, batches, dtype))
        piped.append(segment_seconds(setup.image, setup.model, out, run))
    mpx = args.size**2 / 1e6
    window_mpx = sum(b.shape[0] * b.shape[2] * b.shape[3] for b in batches) / 1e6
    b, s = min(bare), min(piped)
    print(table(["", "seconds (best)", "all rounds", "image Mpx/s", "share of bare throughput"], [
        ["bare model, same windows", f"{b:.2f}", " ".join(f"{t:.2f}" for t in bare), f"{mpx / b:.3f}", "100%"],
        ["segment() end to end", f"{s:.2f}", " ".join(f"{t:.2f}" for t in piped), f"{mpx / s:.3f}",
         f"{100 * b / s:.1f}%"],
    ]))
    print(f"\n{len(batches)} batches, {window_mpx:.2f} Mpx of windows for {mpx:.2f} Mpx of image "
          f"({window_mpx / mpx:.2f}x: the halo).\n")
    if args.stages:
        times = stage_seconds(setup.image, setup.model, out, run)
        print(table(["stage (one more run)", "seconds"], [[k, f"{v:.2f}"] for k, v in times.items()]))
        print()
    if args.quick:
        print("Quick run, a smoke test: the goal is judged at the full size only.")
    else:
        print(goal("segpipe end to end >= 90% of the bare model's throughput", b / s >= 0.9, f"{100 * b / s:.1f}%"))
    print(f"\nLoad average at the end: {load()}")


if __name__ == "__main__":
    main()


def _infer_local(job: Any, model: str, run: Any) -> dict[str, int]:
    """The infer stage in this process, on a pool of its own (the model loaded once)."""
    from pipeline.engine.pool import local_pool

    with local_pool(model, run) as pool:
        return stages.infer(job, run, pool)
