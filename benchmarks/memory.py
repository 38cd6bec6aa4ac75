"""Peak RSS of a whole run (ingest, infer, write, pyramid) as the slide grows: memory must be
bounded by the tile, not the image. Each size runs in a fresh process.

Usage: python benchmarks/memory.py [--sizes 4096 16384 32768] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sizes import parent_args  # noqa: E402  (light: no torch)


def one(size: int, workdir: Path) -> dict:
    """Run segment on a synthetic slide of `size`² in this process; report time and RSS."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import cache_dir, peak_rss_mb, synthetic_slide, tiny_model
    from pipeline.local import segment

    slide = cache_dir() / f"synthetic-{size}.tif"
    if not slide.exists():  # written tile by tile, kept for the next run (32768²: 2.8 GB)
        synthetic_slide(slide.with_suffix(".part"), size).rename(slide)
    model = tiny_model(workdir / "tiny.safetensors")
    before = peak_rss_mb()
    start = time.perf_counter()
    segment(slide, model, workdir / "out", tissue=False, exports=())
    return {"size": size, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": before}


def monai_bytes(size: int, in_channels: int = 3, classes: int = 1) -> float:
    """What MONAI's sliding_window_inference holds for a size² image: the float32 input
    tensor it slices windows from, its float32 output and its float32 count map (both
    allocated whole, monai/inferers/utils.py)."""
    return 4.0 * size * size * (in_channels + classes + 1)


def main() -> None:
    args = parent_args(__doc__, [4096, 16384, 32768], one)
    if args is None:  # a child process: it measured one size
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import goal, load, machine, run_one, table

    sizes = args.sizes
    print(f"## Memory: peak RSS of segment() on synthetic slides (tiny U-Net, tile 1024, tissue skipping "
          f"off, one fresh process per size)\n\nMachine: {machine()}\n")
    rows = [run_one(__file__, ["--one", str(size)], worker_env=True) for size in sizes]
    base = rows[0]["peak_rss_mb"]
    print(table(["size", "Mpx", "seconds", "peak RSS MB", "vs smallest", "MONAI would hold (GB)"], [
        [f"{r['size']}²", f"{r['size'] ** 2 / 1e6:.0f}", f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}",
         f"{r['peak_rss_mb'] / base:.2f}x", f"{monai_bytes(r['size']) / 1e9:.2g}"] for r in rows
    ]))  # fmt: skip
    big = rows[-1]
    print(f"\nMONAI column, from arithmetic (not run): float32 input (3 channels) + float32 output (1 class) "
          f"+ float32 count map, each allocated whole; 32768² needs {monai_bytes(32768) / 1e9:.1f} GB "
          f"before any window is computed.\n")
    ratio = big["peak_rss_mb"] / base
    if args.quick:
        print("Quick run: the goals are judged at 4096² vs 32768² only.")
        return
    print(goal(f"peak RSS at {big['size']}² within 1.2x of {rows[0]['size']}²", ratio <= 1.2, f"{ratio:.2f}x"))
    print(goal(f"peak RSS at {big['size']}² under 2 GB", big["peak_rss_mb"] < 2048,
               f"{big['peak_rss_mb']:.0f} MB"))
    print(f"\nLoad average at the end: {load()}")

if __name__ == "__main__":
    main()
