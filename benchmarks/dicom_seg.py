"""DICOM SEG export of full-resolution X-ray masks: seconds, peak memory and file size of
``export_dicom_seg`` as the X-ray grows (1 and 3 classes), and how long each reader takes
to open the result (highdicom segread with every segment's pixels, dcmqi's
segimage2itkimage). Each size runs in a fresh process.

The export holds the whole mask (the export applies to X-rays): the figure to watch is the
export's peak allocation (tracemalloc, which numpy reports to; a second, traced export, so
the timed one runs at full speed) against the mask's own size.

Usage: python benchmarks/dicom_seg.py [--sizes 2048 3072 4096] [--quick]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.sizes import parent_args  # noqa: E402  (light: no torch)

CLASSES = {1: ["lung"], 3: ["lung", "heart", "tumour"]}


def _mask(size: int, classes: int):
    """size² labels: two lung-like discs (class 1) and, with 3 classes, a heart and a
    small tumour, so every segment has pixels."""
    import numpy as np

    yy, xx = np.ogrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    for cx in (0.32, 0.68):
        mask[((xx / size - cx) / 0.14) ** 2 + ((yy / size - 0.45) / 0.28) ** 2 < 1] = 1
    if classes == 3:
        mask[((xx / size - 0.52) / 0.1) ** 2 + ((yy / size - 0.62) / 0.12) ** 2 < 1] = 2
        mask[((xx / size - 0.3) / 0.03) ** 2 + ((yy / size - 0.35) / 0.03) ** 2 < 1] = 3
    return mask


def one(size: int, workdir: Path) -> dict:
    """Export a size² mask of each class count against a size² DX; time the readers."""
    import tracemalloc

    import highdicom as hd
    import numpy as np

    from pipeline.cards import ModelId
    from pipeline.io.dicom_seg import export_dicom_seg
    from tests.io_fixtures import dicom_dataset, write_dicom

    source = write_dicom(workdir / "x.dcm", dicom_dataset(np.zeros((size, size), np.uint16), 12,
                                                          ImagerPixelSpacing=[0.139, 0.139]))  # fmt: skip
    model = ModelId("lung-xray", "0285f3c1db69")
    result: dict = {"size": size}
    for classes, names in CLASSES.items():
        mask = _mask(size, classes)
        start = time.perf_counter()
        seg = Path(export_dicom_seg(source, mask, names, workdir / f"x{classes}.seg.dcm", model))
        result[f"export_s_{classes}"] = time.perf_counter() - start
        tracemalloc.start()
        export_dicom_seg(source, mask, names, workdir / "traced.seg.dcm", model)
        result[f"peak_mb_{classes}"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        result[f"file_mb_{classes}"] = seg.stat().st_size / 2**20
        start = time.perf_counter()
        hd.seg.segread(seg).get_pixels_by_source_instance(
            source_sop_instance_uids=[hd.imread(source, lazy_frame_retrieval=True).SOPInstanceUID],
            segment_numbers=list(range(1, classes + 1)),
        )
        result[f"segread_s_{classes}"] = time.perf_counter() - start
        converter = shutil.which("segimage2itkimage", path=str(Path(sys.executable).parent))
        if converter:
            (workdir / f"itk{classes}").mkdir()
            start = time.perf_counter()
            subprocess.run([converter, "--inputDICOM", str(seg), "--outputDirectory", str(workdir / f"itk{classes}")],
                           check=True, capture_output=True)  # fmt: skip
            result[f"dcmqi_s_{classes}"] = time.perf_counter() - start
    result["mask_mb"] = size * size / 2**20
    return result


def main() -> None:
    args = parent_args(__doc__, [2048, 3072, 4096], one)
    if args is None:  # a child process: it measured one size
        return
    import json
    import os
    import platform

    rows = []
    for size in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True, text=True,
                              cwd=ROOT, check=True)  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"## DICOM SEG export (BINARY, uncompressed), one fresh process per size\n\n"
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| size | classes | export s | export peak alloc MB | mask MB | SEG file MB | segread s | dcmqi s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for c in CLASSES:
            print(f"| {r['size']}² | {c} | {r[f'export_s_{c}']:.2f} | {r[f'peak_mb_{c}']:.0f} "
                  f"| {r['mask_mb']:.0f} | {r[f'file_mb_{c}']:.1f} | "
                  f"{r[f'segread_s_{c}']:.2f} | {r.get(f'dcmqi_s_{c}', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
