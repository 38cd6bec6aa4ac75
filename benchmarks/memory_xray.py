"""Peak RSS of a whole X-ray run (ingest, infer, full-resolution delivery, pyramid, overlay) as
the X-ray grows, with the shipped lung-xray model (working size 256², default tile 1024):
memory must be bounded by the tile and the window, not the image, whatever the model's
scale. Each size runs in a fresh process; the PNGs are written by another one.

What grows by design: a PNG decodes whole (bounded by max_pixels), and its compressed bytes
are held while it decodes. The figure that must stay flat is the rest: peak RSS minus the
decoded image and the file.

Usage: python benchmarks/memory_xray.py [--sizes 2048 8192 16384] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sizes import parent_args  # noqa: E402  (light: no torch)

BAND = 1024  # rows per band when writing the synthetic X-ray


def make(size: int) -> Path:
    """A size² 8-bit grey chest-X-ray-like PNG (body, two darker lungs, rib texture, a little
    noise), kept in the cache directory for the next run."""
    sys.path.insert(0, str(ROOT))
    import imagecodecs
    import numpy as np

    from benchmarks.common import cache_dir

    path = cache_dir() / f"xray-{size}.png"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    pixels = np.empty((size, size), np.uint8)
    x = (np.arange(size, dtype=np.float32) + 0.5) / size
    for y0 in range(0, size, BAND):
        y = ((np.arange(y0, min(y0 + BAND, size), dtype=np.float32) + 0.5) / size)[:, None]
        body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
        lungs = np.zeros(body.shape, bool)
        for cx in (0.32, 0.68):
            lungs |= ((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.28) ** 2 < 1
        value = 40 + 150 * body - 90 * lungs + 12 * np.sin(y * 60) * lungs
        value += rng.normal(0, 3, value.shape).astype(np.float32)
        pixels[y0 : y0 + BAND] = np.clip(value, 0, 255).astype(np.uint8)
    part = path.with_suffix(".part")
    part.write_bytes(imagecodecs.png_encode(pixels, level=1))
    part.rename(path)
    return path


def one(size: int, workdir: Path) -> dict:
    """segment() on the cached size² PNG in this process; report time and peak RSS."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import cache_dir, peak_rss_mb
    from pipeline.local import segment
    from pipeline.store import OutputStore

    image = cache_dir() / f"xray-{size}.png"
    before = peak_rss_mb()
    start = time.perf_counter()
    out = segment(image, "lung-xray", workdir / "out")
    store = OutputStore.open(out)
    return {"size": size, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": before, "full_chunk": store.layout.full_chunk, "state": store.state,
            "decoded_mb": size * size / 2**20, "file_mb": image.stat().st_size / 2**20}


def main() -> None:
    args = parent_args(__doc__, [2048, 8192, 16384], one, make)
    if args is None:  # a child process: it measured one size
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import goal, load, machine, run_one, table

    sizes = args.sizes
    print(f"## Memory, X-rays: peak RSS of segment() on grey PNG X-rays (shipped lung-xray, working "
          f"size 256², tile 1024, one fresh process per size)\n\nMachine: {machine()}\n")
    for size in sizes:
        run_one(__file__, ["--make", str(size)])
    rows = [run_one(__file__, ["--one", str(size)], worker_env=True) for size in sizes]
    base = rows[0]
    for r in rows:  # the file and its decoded pixels are held by design; the rest must not grow
        r["beyond_mb"] = r["peak_rss_mb"] - r["decoded_mb"] - r["file_mb"]
    print(table(["size", "Mpx", "seconds", "peak RSS MB", "vs smallest", "decoded PNG MB", "PNG file MB",
                 "peak - decoded - file MB", "mask chunk"], [
        [f"{r['size']}²", f"{r['size'] ** 2 / 1e6:.0f}", f"{r['seconds']:.1f}", f"{r['peak_rss_mb']:.0f}",
         f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x", f"{r['decoded_mb']:.0f}", f"{r['file_mb']:.0f}",
         f"{r['beyond_mb']:.0f}", f"{r['full_chunk']}²"] for r in rows
    ]))  # fmt: skip
    big = rows[-1]
    ratio = big["beyond_mb"] / base["beyond_mb"]
    print()
    if args.quick:
        print("Quick run: the goals are judged at the default sizes only.")
        return
    print(goal(f"peak RSS beyond the decoded PNG and its file at {big['size']}² within 1.5x of "
               f"{base['size']}²", ratio <= 1.5, f"{ratio:.2f}x"))
    print(goal(f"peak RSS at {big['size']}² under 2 GB", big["peak_rss_mb"] < 2048,
               f"{big['peak_rss_mb']:.0f} MB, {big['peak_rss_mb'] / base['peak_rss_mb']:.2f}x {base['size']}²"))
    print(f"\nLoad average at the end: {load()}")


if __name__ == "__main__":
    main()
