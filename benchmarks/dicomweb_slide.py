"""A DICOM WSI through DICOMweb against the same series' files, and its tiled DICOM SEG.

Part 1: one series (JPEG frames, or uncompressed with --uncompressed) stored in a real
Orthanc with its DICOMweb plugin (tests/orthanc.py; Orthanc 1.10 listens on every
interface, so this runs only inside tests/isolated.sh's loopback-only namespace, and says
so elsewhere). Open time (metadata) and random 512² region reads at level 0, through
segpipe's DICOMweb reader and its file reader, each opened afresh (cold caches), three
rounds interleaved, medians kept; frames fetched per region.

Part 2: seconds, peak allocation (tracemalloc), frames and file size of a slide's tiled
BINARY SEG (pipeline.io.dicom_seg_slide) of a tissue-like mask, one size per process.

Usage: sh tests/isolated.sh python benchmarks/dicomweb_slide.py [--size 4096] [--regions 50]
           [--seg-sizes 4096 8192 16384] [--quick] [--skip-reads]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REGION = 512
ROUNDS = 3


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def reads(size: int, regions: int, compression: str) -> str:
    """Part 1's table (markdown), or the line saying why it was not measured."""
    import os

    import pydicom

    from pipeline.io import open_image
    from tests.orthanc import Orthanc, unavailable
    from tests.slide_fixtures import tissue_rgb, write_dicom_wsi

    why = unavailable()
    if why:
        return f"DICOMweb reads not measured: {why}\n"
    work = Path(tempfile.mkdtemp(prefix="segpipe-dicomweb-bench-"))
    paths = write_dicom_wsi(work / "slide", tissue_rgb(size, size), tile=256, mpp=0.25, levels=3,
                            compression=compression)  # fmt: skip
    (work / "orthanc").mkdir()
    server = Orthanc(work / "orthanc")
    server.start()
    try:
        os.environ.update(server.env())
        server.upload(*[pydicom.dcmread(p) for p in paths])
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        uri = f"{server.source}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        rng = random.Random(0)
        boxes = [(rng.randrange(size - REGION), rng.randrange(size - REGION)) for _ in range(regions)]
        frames = _counting()
        timings: dict[str, list[tuple[float, float]]] = {"DICOMweb (Orthanc)": [], "files": []}
        for _ in range(ROUNDS):
            for name, where in (("DICOMweb (Orthanc)", uri), ("files", paths[0])):
                start = time.perf_counter()
                with open_image(where) as image:
                    opened = time.perf_counter() - start
                    start = time.perf_counter()
                    for y, x in boxes:
                        image.read_region(0, y, x, REGION, REGION)
                    timings[name].append((opened, (time.perf_counter() - start) / regions))
        per_region = len(frames) / (ROUNDS * regions)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = [f"| {name} | {statistics.median(t[0] for t in ts) * 1e3:.1f} | "
            f"{statistics.median(t[1] for t in ts) * 1e3:.1f} |" for name, ts in timings.items()]  # fmt: skip
    web, files = (statistics.median(t[1] for t in timings[n]) for n in timings)
    return "\n".join([
        f"{size}² DICOM WSI, 3 levels, 256² {compression} frames; {regions} random {REGION}² regions at "
        f"level 0, median of {ROUNDS} rounds; {per_region:.1f} frames fetched per region through DICOMweb "
        f"(after wsidicom's frame cache); "
        f"load average {load()}", "",
        "| reader | open (ms) | region read (ms) |", "|---|---|---|", *rows, "",
        f"DICOMweb / files region read: {web / files:.2f}x", "",
    ])  # fmt: skip


def _counting() -> list[int]:
    """Frame numbers fetched through wsidicom's DICOMweb client, appended as they come."""
    from wsidicom.web import WsiDicomWebClient

    fetched: list[int] = []
    original = WsiDicomWebClient.get_frames

    def counting(self, study, series, instance, numbers, syntax):  # type: ignore[no-untyped-def]
        fetched.extend(numbers)
        return original(self, study, series, instance, numbers, syntax)

    WsiDicomWebClient.get_frames = counting  # type: ignore[method-assign]
    return fetched


def seg_one(size: int) -> dict[str, float]:
    """Write the SEG of a size² tissue-like mask on a size² DICOM WSI; seconds (untraced),
    the export's peak allocation (tracemalloc, which numpy reports to: a second, traced
    export), bytes and frames."""
    import tracemalloc

    import numpy as np
    import pydicom

    from pipeline.cards import ModelId
    from pipeline.io.dicom_seg_slide import export_slide_seg
    from tests.slide_fixtures import write_dicom_wsi

    work = Path(tempfile.mkdtemp(prefix="segpipe-seg-bench-"))
    yy, xx = np.ogrid[:size, :size]
    mask = ((((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.3)) ** 2) <= 1).astype(np.uint8)
    # the SEG reads only the source's headers: grey JPEG frames keep its source small
    grey = np.broadcast_to(np.uint8(200), (size, size, 3))
    paths = write_dicom_wsi(work / "slide", grey, tile=256, levels=1, compression="jpeg")
    model = ModelId.from_provenance({"card": {"name": "tissue-he", "weights_sha256": "ab" * 32}})
    start = time.perf_counter()
    out = export_slide_seg(paths[0], [mask], ["tissue"], work / "slide.seg.dcm", model)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    export_slide_seg(paths[0], [mask], ["tissue"], work / "traced.seg.dcm", model)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    frames = int(pydicom.dcmread(out, stop_before_pixels=True).NumberOfFrames)
    size_bytes = Path(out).stat().st_size
    shutil.rmtree(work, ignore_errors=True)
    return {"size": size, "seconds": seconds, "peak_mb": peak, "mask_mb": mask.nbytes / 2**20,
            "bytes": size_bytes, "frames": frames, "tiles": (-(-size // 256)) ** 2}  # fmt: skip


def segs(sizes: list[int]) -> str:
    rows = []
    for size in sizes:
        proc = subprocess.run([sys.executable, __file__, "--seg-one", str(size)], capture_output=True,
                              text=True, check=True, cwd=ROOT)  # fmt: skip
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(f"| {size}² | {r['seconds']:.1f} | {r['peak_mb']:.0f} ({r['mask_mb']:.0f}) | "
                    f"{r['frames']} of {r['tiles']} | {r['bytes'] / 1e6:.2f} |")  # fmt: skip
    return "\n".join([
        f"Tiled BINARY SEG (uncompressed) of a tissue ellipse (~33% of the slide), 256² frames, empty ones "
        f"omitted, one size per process; load average {load()}", "",
        "| mask | write (s) | export's peak allocation, MB (the mask's) | frames | file (MB) |",
        "|---|---|---|---|---|", *rows, "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--regions", type=int, default=50)
    parser.add_argument("--uncompressed", action="store_true")
    parser.add_argument("--seg-sizes", type=int, nargs="*", default=[4096, 8192, 16384])
    parser.add_argument("--skip-reads", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seg-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seg_one:
        print(json.dumps(seg_one(args.seg_one)))
        return
    if args.quick:
        args.size, args.regions, args.seg_sizes = 2048, 20, [2048]
    print("## DICOM WSI through DICOMweb (benchmarks/dicomweb_slide.py)\n")
    if not args.skip_reads:
        print(reads(args.size, args.regions, "none" if args.uncompressed else "jpeg"))
    print(segs(args.seg_sizes))


if __name__ == "__main__":
    main()
