"""UNet++ pruning trade-off: forward time of prune levels L1..L4 relative to L4 (same
process, same weights, same input). Usage: python benchmarks/prune_levels.py [--size 512]"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models import build_model


def time_forward(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Best-of-`repeats` seconds for one forward pass (after one warm-up)."""
    with torch.inference_mode():
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
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("unetpp", in_channels=3, classes=1, deep_supervision=True).eval()
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    for level in (1, 2, 3, 4):
        model.set_mode("fast", level)
        rows.append((level, time_forward(model, x, args.repeats)))
    full = rows[-1][1]
    print(f"UNet++ [32..512], fp32, 1x3x{args.size}x{args.size}, torch threads={torch.get_num_threads()}")
    print("level  seconds  speed-up vs L4")
    for level, seconds in rows:
        print(f"L{level}     {seconds:7.3f}  {full / seconds:6.1f}x")


if __name__ == "__main__":
    main()
