"""Slide mask exports as their readers see them: OpenSlide's 1024-px thumbnail of the
OME-TIFF export (levels in SubIFDs) against the `tiff` export (levels as top-level IFDs),
and the `geojson` export's time, memory and size. Each measurement runs in a fresh process
(peak RSS is per process).

The mask is synthetic, SIZE^2 (default 20000), built chunk by chunk into a zarr pyramid
shaped as a store's (level k = level k-1 halved, nearest, down to <= 1024): tissue
ellipses covering about a third of the slide, with nuclei (discs of radius 4-7 px, class 2)
scattered in them, some across chunk borders. Cached in the benchmark cache directory.

Usage: python benchmarks/slide_exports.py [--size 20000] [--quick] [--skip-geojson]
(--quick: 4096^2. OpenSlide decodes the whole OME-TIFF level for its thumbnail: about
3.2 GB of memory at 20000^2, 4x that at 40000^2.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import zarr  # noqa: E402

CHUNK = 1024
CLASSES = ("tissue", "nucleus")
MPP = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="a 4096^2 mask")
    parser.add_argument("--skip-geojson", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # (what, path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](Path(args.child[1]))))
        return
    if args.quick:
        args.size = 4096
    # the cache common.cache_dir uses (not imported: it loads torch, which this never needs)
    folder = Path(os.environ.get("SEGPIPE_BENCH_CACHE", Path(tempfile.gettempdir()) / "segpipe-bench"))
    folder = folder / f"slide-exports-{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    mask = build_mask(folder / "mask.zarr", args.size)
    print(f"## Slide mask exports (benchmarks/slide_exports.py), {args.size}² mask\n")
    files = {"ome-tiff": folder / "mask.ome.tif", "tiff": folder / "mask.tif"}
    print("| export | write s | file MB | OpenSlide levels | thumbnail s (CPU s) | thumbnail peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, path in files.items():
        written = child("write-" + name, mask)
        shown = child("thumbnail", path)
        print(f"| {name} | {written['seconds']:.1f} | {path.stat().st_size / 1e6:.1f} | {shown['levels']} "
              f"| {shown['seconds']:.2f} ({shown['cpu_seconds']:.2f}) | {shown['peak_rss_mb']:.0f} |")  # fmt: skip
    if not args.skip_geojson:
        done = child("geojson", mask)
        print(f"\ngeojson: {done['seconds']:.1f} s ({done['cpu_seconds']:.1f} CPU s), peak RSS "
              f"{done['peak_rss_mb']:.0f} MB, {done['mb']:.1f} MB, features {done['counts']}")  # fmt: skip


def child(what: str, path: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its JSON answer."""
    out = subprocess.run([sys.executable, __file__, "--child", what, str(path)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def build_mask(path: Path, size: int) -> Path:
    """The synthetic mask pyramid (cached): level 0 chunk by chunk, then each level from the
    one above, a block at a time."""
    if (path.parent / "mask.done").exists():
        return path
    from pipeline.store.layout import pyramid_shapes

    rng = np.random.default_rng(0)
    ellipses = [(rng.uniform(0.15, 0.85) * size, rng.uniform(0.15, 0.85) * size,
                 rng.uniform(0.08, 0.2) * size, rng.uniform(0.08, 0.2) * size) for _ in range(6)]  # fmt: skip
    nuclei = rng.uniform(0, size, (size * size // 900, 2))  # one candidate per 30x30 px
    radii = rng.integers(4, 8, len(nuclei))
    group = zarr.open_group(path, mode="w")
    shapes = pyramid_shapes((size, size))
    levels = [group.create_array(str(k), shape=s, dtype="uint8", chunks=(min(CHUNK, s[0]), min(CHUNK, s[1])),
                                 fill_value=0) for k, s in enumerate(shapes)]  # fmt: skip
    for y in range(0, size, CHUNK):
        for x in range(0, size, CHUNK):
            levels[0][y : y + CHUNK, x : x + CHUNK] = _chunk(y, x, size, ellipses, nuclei, radii)
    for k in range(1, len(levels)):
        block = 2 * CHUNK
        for y in range(0, shapes[k - 1][0], block):
            for x in range(0, shapes[k - 1][1], block):
                levels[k][y // 2 : (y + block) // 2, x // 2 : (x + block) // 2] = levels[k - 1][
                    y : y + block : 2, x : x + block : 2
                ]
    (path.parent / "mask.done").touch()
    return path


def _chunk(y: int, x: int, size: int, ellipses: list, nuclei: np.ndarray, radii: np.ndarray) -> np.ndarray:
    h, w = min(CHUNK, size - y), min(CHUNK, size - x)
    rows, cols = np.mgrid[y : y + h, x : x + w].astype(np.float32)
    tissue = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ellipses:
        tissue |= ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    labels = tissue.astype(np.uint8)
    near = (nuclei[:, 0] > y - 8) & (nuclei[:, 0] < y + h + 8) & (nuclei[:, 1] > x - 8) & (nuclei[:, 1] < x + w + 8)
    for (cy, cx), r in zip(nuclei[near], radii[near], strict=True):
        y0, y1 = int(max(cy - r, y)), int(min(cy + r + 1, y + h))
        x0, x1 = int(max(cx - r, x)), int(min(cx + r + 1, x + w))
        disc = (rows[y0 - y : y1 - y, x0 - x : x1 - x] - cy) ** 2 + (cols[y0 - y : y1 - y, x0 - x : x1 - x] - cx) ** 2
        patch = labels[y0 - y : y1 - y, x0 - x : x1 - x]
        patch[(disc <= r * r) & (patch > 0)] = 2  # nuclei only in tissue
    return labels


def _levels(path: Path) -> list[zarr.Array]:
    group = zarr.open_group(path, mode="r")
    return [group[str(k)] for k in range(len(list(group.array_keys())))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _cpu_seconds() -> float:
    """CPU time of this process: on a shared machine, steadier than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write(kind: str):
    def write(path: Path) -> dict[str, Any]:
        from pipeline.io.exports import export_ome_tiff
        from pipeline.io.slide_tiff import export_slide_tiff

        levels = _levels(path)
        start = time.perf_counter()
        if kind == "ome-tiff":
            export_ome_tiff(levels, path.parent / "mask.ome.tif", MPP)
        else:
            export_slide_tiff(levels, CLASSES, path.parent / "mask.tif", MPP)
        return {"seconds": time.perf_counter() - start}

    return write


def _thumbnail(path: Path) -> dict[str, Any]:
    import openslide

    start, cpu = time.perf_counter(), _cpu_seconds()
    with openslide.OpenSlide(path) as slide:
        slide.get_thumbnail((1024, 1024))
        levels = slide.level_count
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu,
            "peak_rss_mb": _peak_rss_mb(), "levels": levels}  # fmt: skip


def _geojson(path: Path) -> dict[str, Any]:
    from pipeline.io.geojson import export_geojson

    out = path.parent / "mask.geojson"
    start, cpu = time.perf_counter(), _cpu_seconds()
    counts = export_geojson(_levels(path)[0], CLASSES, out, MPP)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu,
            "peak_rss_mb": _peak_rss_mb(), "mb": out.stat().st_size / 1e6, "counts": counts}  # fmt: skip


CHILDREN = {"write-ome-tiff": _write("ome-tiff"), "write-tiff": _write("tiff"),
            "thumbnail": _thumbnail, "geojson": _geojson}  # fmt: skip


if __name__ == "__main__":
    main()
