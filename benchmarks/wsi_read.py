"""Reading speed of whole-slide formats: open time and random 512² region reads at level 0,
through segpipe's readers and through OpenSlide (its own tile cache, 32 MiB by default).

Slides (written once into the cache directory): the real TCGA-CR-7395 SVS (Aperio JPEG 2000,
33005) when present, else a synthetic one; an Aperio JPEG SVS, a DICOM WSI (JPEG frames,
wsidicom) and an NDPI (JPEG levels with restart markers) of the same pixels; and (full run) a 12288² JPEG 2000
SVS of its tiles repeated, whose decoded tiles (432 MiB) fit neither reader's cache. Each reader opens its slide afresh
(cold caches) and reads the same random regions; three rounds, readers interleaved within a
round so that they share the machine's load, the median kept.

Usage: python benchmarks/wsi_read.py [--regions 200] [--quick] [--slides svs-jpeg ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import SLIDE, bench_image, cache_dir, goal, load, machine, table  # noqa: E402
from pipeline.io import Limits, open_image  # noqa: E402
from pipeline.io.tiff import TiffImage  # noqa: E402
from tests.slide_fixtures import write_aperio, write_dicom_wsi, write_ndpi_like  # noqa: E402

REGION = 512
ROUNDS = 3
GOAL = 1.10  # segpipe's read time over OpenSlide's, at most
Reader = tuple[Callable[[int, int], np.ndarray], Callable[[], None]]


def slides(quick: bool) -> dict[str, Path]:
    """Name -> path of each benchmark slide, written once per size."""
    size = 2048 if quick else 4096
    folder = cache_dir() / f"wsi-read-{'quick' if quick else 'full'}"
    folder.mkdir(parents=True, exist_ok=True)
    pixels = None

    def level0() -> np.ndarray:
        """The real slide's level 0 (full run), a crop of it (quick), else synthetic."""
        nonlocal pixels
        if pixels is None and not quick and SLIDE.is_file():
            with open_image(SLIDE) as real:
                pixels = real.read_region(0, 0, 0, *real.levels[0][:2])
        if pixels is None:
            pixels = bench_image(size)[0]
        return pixels

    made = {"svs-jpeg2000": folder / "jp2k.svs", "svs-jpeg": folder / "jpeg.svs",
            "dicom-wsi-jpeg": folder / "dicom", "ndpi-jpeg": folder / "ndpi.tif"}  # fmt: skip
    if not quick and SLIDE.is_file():
        made["svs-jpeg2000"] = SLIDE  # the real slide: 4443x3567, Aperio 33005
    if not made["svs-jpeg2000"].exists():
        write_aperio(made["svs-jpeg2000"], level0(), compression="jpeg2000", levels=3)
    if not made["svs-jpeg"].exists():
        write_aperio(made["svs-jpeg"], level0(), compression="jpeg", levels=3)
    if not made["dicom-wsi-jpeg"].exists():
        write_dicom_wsi(made["dicom-wsi-jpeg"], level0(), tile=256, compression="jpeg")
    if not made["ndpi-jpeg"].exists():
        write_ndpi_like(made["ndpi-jpeg"], level0(), blocks=64)  # 512-px restart intervals
    if not quick:  # larger than either cache: random regions rarely share a tile
        made["svs-jpeg2000-large"] = folder / "jp2k-large.svs"
        if not made["svs-jpeg2000-large"].exists():
            large_svs(made["svs-jpeg2000-large"], level0(), LARGE_SIDE)
    return made


LARGE_SIDE = 12288


def large_svs(path: Path, source: np.ndarray, side: int, tile: int = 256) -> Path:
    """A side² single-level Aperio JPEG 2000 SVS written tile by tile: the tiles of `source`
    repeated, each flipped by its position so that neighbours differ."""
    rows, cols = source.shape[0] // tile, source.shape[1] // tile
    tiles = [source[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]

    def stream():
        for index in range((side // tile) ** 2):
            yield tiles[index % len(tiles)][:: 1 - 2 * (index % 2)]

    description = f"Aperio Image Library v12.0.15 \n{side}x{side} [0,0 {side}x{side}] ({tile}x{tile}) J2K|MPP = 0.25"
    tifffile.imwrite(path, stream(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression=33005, description=description, metadata=None, bigtiff=False)  # fmt: skip
    return path


def segpipe(path: Path, cache_bytes: int | None = None) -> Reader:
    image = open_image(path) if cache_bytes is None else TiffImage(path, Limits(), cache_bytes)
    return (lambda y, x: image.read_region(0, y, x, REGION, REGION)), image.close


def openslide_direct(path: Path) -> Reader:
    import openslide

    if path.is_dir():  # a DICOM WSI folder: OpenSlide opens one instance and finds the rest
        path = sorted(path.glob("*.dcm"))[0]
    slide = openslide.OpenSlide(str(path))
    return (lambda y, x: np.asarray(slide.read_region((x, y), 0, (REGION, REGION)))), slide.close


def segpipe_openslide(path: Path) -> Reader:
    from pipeline.io.openslide_image import OpenSlideImage

    image = OpenSlideImage(path, Limits())
    return (lambda y, x: image.read_region(0, y, x, REGION, REGION)), image.close


READERS: dict[str, Callable[[Path], Reader]] = {
    "segpipe": segpipe,
    "segpipe, cache 32 MiB": lambda p: segpipe(p, 32 << 20),
    "segpipe, no cache": lambda p: segpipe(p, 0),
    "segpipe, tifffile": lambda p: segpipe(p, 64 << 20),  # the tiff reader, whatever sniff picks
    "OpenSlide (its cache)": openslide_direct,
    "segpipe's OpenSlide reader": segpipe_openslide,
}
# which readers each slide is read with (those that read its format)
PLAN = {
    "svs-jpeg2000": list(READERS),
    "svs-jpeg": list(READERS),
    "dicom-wsi-jpeg": ["segpipe", "OpenSlide (its cache)"],
    "ndpi-jpeg": ["segpipe", "segpipe, tifffile", "OpenSlide (its cache)"],
    "svs-jpeg2000-large": ["segpipe", "segpipe, no cache", "OpenSlide (its cache)"],
}


def corners(path: Path, count: int) -> list[tuple[int, int]]:
    with open_image(path) as image:
        height, width, _ = image.levels[0]
    rng = np.random.default_rng(0)
    return [(int(rng.integers(0, height - REGION)), int(rng.integers(0, width - REGION))) for _ in range(count)]


def one_round(make: Callable[[Path], Reader], path: Path, regions: list[tuple[int, int]]) -> tuple[float, float]:
    """(open seconds, read seconds for all regions) with a freshly opened reader."""
    start = time.perf_counter()
    read, close = make(path)
    opened = time.perf_counter() - start
    start = time.perf_counter()
    for y, x in regions:
        read(y, x)
    took = time.perf_counter() - start
    close()
    return opened, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="2048² synthetic slides, 50 regions")
    parser.add_argument("--slides", nargs="+", choices=list(PLAN), help="read only these slides")
    args = parser.parse_args()
    count = 50 if args.quick else args.regions
    made = {k: v for k, v in slides(args.quick).items() if not args.slides or k in args.slides}
    rows, ratios = [], {}
    for name, path in made.items():
        regions = corners(path, count)
        times: dict[str, list[tuple[float, float]]] = {reader: [] for reader in PLAN[name]}
        for _ in range(ROUNDS):
            for reader in PLAN[name]:
                times[reader].append(one_round(READERS[reader], path, regions))
        with open_image(path) as image:
            shape = "x".join(map(str, image.levels[0][:2]))
        for reader, runs in times.items():
            opened = statistics.median(o for o, _ in runs)
            took = statistics.median(t for _, t in runs)
            rows.append([name, shape, reader, f"{opened * 1e3:.1f}", f"{took:.2f}", f"{took / count * 1e3:.1f}"])
            times[reader] = [(opened, took)]
        if "OpenSlide (its cache)" in times and name.startswith(("svs", "ndpi")):
            ratios[name] = times["segpipe"][0][1] / times["OpenSlide (its cache)"][0][1]
    print(f"## Whole-slide reading (benchmarks/wsi_read.py)\n\nMachine: {machine()}\n")
    print(f"{count} random {REGION}² regions at level 0 per reader, median of {ROUNDS} rounds, each "
          "with a freshly opened reader (cold caches).\n")
    print(table(["slide", "level 0", "reader", "open ms", f"{count} reads s", "ms/region"], rows))
    print()
    for name, ratio in ratios.items():
        print(goal(f"segpipe's reads on {name} at most {GOAL:.2f}x OpenSlide's", ratio <= GOAL,
                   f"{ratio:.2f}x"))
    print(f"\nLoad at the end: {load()}")


if __name__ == "__main__":
    main()
