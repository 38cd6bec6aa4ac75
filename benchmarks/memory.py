"""Peak RSS of a whole run (ingest, infer, write, pyramid) as the slide grows: memory must be
bounded by the tile, not the image. Each size runs in a fresh process.

Usage: python benchmarks/memory.py [--sizes 4096 16384 32768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(size: int, workdir: Path) -> dict:
    """Run segment on a synthetic slide of `size`² in this process; report time and RSS."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import peak_rss_mb, synthetic_slide, tiny_model
    from pipeline.local import segment

    slide = synthetic_slide(workdir / f"slide{size}.tif", size)
    model = tiny_model(workdir / "tiny.safetensors")
    before = peak_rss_mb()
    start = time.perf_counter()
    segment(slide, model, workdir / "out", tissue=False, exports=())
    return {"size": size, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(args.one, Path(tmp))))
        return
    rows = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True,
                             text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    print("Peak RSS of segment() on synthetic slides (tiny U-Net, tile 1024, tissue skipping off)")
    print(f"{'size':>8} {'Mpx':>8} {'seconds':>8} {'peak RSS MB':>12} {'vs first':>9}")
    for r in rows:
        print(f"{r['size']:>8} {r['size'] ** 2 / 1e6:>8.0f} {r['seconds']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / base:>8.2f}x")


if __name__ == "__main__":
    main()
