"""UNet++ pruning trade-off: forward time of prune levels L1..L4 relative to L4 (same
process, same weights, same input), at fp32 and bf16 autocast, with BatchNorm folded and
channels_last as segpipe runs it.

Usage: python benchmarks/prune_levels.py [--size 512] [--repeats 3] [--quick]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import as_segpipe_runs, in_worker_env, machine, table  # noqa: E402
from pipeline.models import build_model  # noqa: E402


def time_forward(model: torch.nn.Module, x: torch.Tensor, repeats: int, bf16: bool = False) -> float:
    """Best-of-`repeats` seconds for one forward pass (after one warm-up)."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="128² input, one repeat")
    args = parser.parse_args()
    in_worker_env()
    if args.quick:
        args.size, args.repeats = 128, 1
    torch.manual_seed(0)
    model = as_segpipe_runs(build_model("unetpp", in_channels=3, classes=1, deep_supervision=True))
    x = torch.randn(1, 3, args.size, args.size).to(memory_format=torch.channels_last)
    rows = {}
    for level in (1, 2, 3, 4):
        model.set_mode("fast", level)
        rows[level] = [time_forward(model, x, args.repeats, bf16) for bf16 in (False, True)]
    print(f"## UNet++ [32..512] prune levels: 1x3x{args.size}x{args.size}, channels_last, best of "
          f"{args.repeats}\n\nMachine: {machine()}\n")
    fp32_l4, bf16_l4 = rows[4]
    print(table(["level", "seconds fp32", "speed-up vs L4", "seconds bf16", "speed-up vs L4",
                 "bf16 vs fp32"], [
        [f"L{level}", f"{fp32:.3f}", f"{fp32_l4 / fp32:.1f}x", f"{bf16:.3f}", f"{bf16_l4 / bf16:.1f}x",
         f"{fp32 / bf16:.2f}x"] for level, (fp32, bf16) in rows.items()
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
