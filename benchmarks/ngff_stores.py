"""Output stores as the field's readers see them: for each ``*.zarr`` under the given folders,
what the ``ome-zarr-models`` validator says of the store (the image group with its labels),
what ome-zarr-py's reader finds (nodes, levels, shapes, level-0 scale, visibility), the
full-resolution mask's chunk side, and the time a viewer takes to read a 512² region of
it at full resolution (median of READS reads at random places, each a fresh open of the
array, so no chunk is cached by zarr; the page cache is warm after the first).

A figure, not a test: it reads stores of any format (those from before and after a
layout change alike) and never fails on what it finds.

``--chunks MASK`` times the same 512² reads of one full-resolution mask copied at several
chunk sides (16384: what tile x scale gave the tissue model, 1024 tiles at 16x, before
the 2048 bound; 2048; 1024), into a temporary folder.

Usage: python benchmarks/ngff_stores.py demo-out [more folders]
       python benchmarks/ngff_stores.py --chunks demo-out/tissue-he/<id>.zarr/labels/mask/0
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

READS = 9
REGION = 512


def validate(path: Path) -> str:
    """'valid', or the validator's first error line."""
    from ome_zarr_models.v05.image import Image

    try:
        Image.from_zarr(zarr.open_group(path, mode="r"))
    except Exception as exc:  # the validator raises pydantic, Runtime and Value errors
        causes = []
        while exc is not None:  # the validator wraps the reason in one or two RuntimeErrors
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            causes.append(f"{type(exc).__name__}: {' | '.join(lines[:3])}"[:300])
            exc = exc.__cause__
        return "INVALID " + " <- ".join(causes)
    return "valid"


def reader_nodes(path: Path) -> list[str]:
    """One line per node ome-zarr-py's reader yields from the store's root."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    lines = []
    for node in Reader(parse_url(str(path)))():
        if not node.data:
            continue
        kind = "labels" if node.load(Label) else "image"
        transforms = node.metadata.get("coordinateTransformations") or [[{}]]
        scale0 = next((t.get("scale") for t in transforms[0] if "scale" in t), None)
        shapes = [tuple(d.shape) for d in node.data]
        where = str(node.zarr).split(".zarr", 1)[-1] or "/"
        lines.append(f"{kind:6} {where:14} visible={node.visible!s:5} levels={len(shapes)} "
                     f"level0={shapes[0]} scale0={scale0} coarsest={shapes[-1]}")  # fmt: skip
    return lines


def read_time_ms(array_path: Path) -> tuple[float, tuple[int, ...]]:
    """Median ms to read a REGION² box at random places of a (y, x) array, and its chunks."""
    rng = np.random.default_rng(0)
    arr = zarr.open_array(array_path, mode="r")
    h, w = arr.shape[-2:]
    times = []
    for _ in range(READS):
        y, x = int(rng.integers(0, max(1, h - REGION))), int(rng.integers(0, max(1, w - REGION)))
        start = time.perf_counter()
        fresh = zarr.open_array(array_path, mode="r")
        np.asarray(fresh[..., y : y + REGION, x : x + REGION])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), tuple(arr.chunks)


def report(path: Path) -> None:
    print(f"== {path}")
    print(f"   ome-zarr-models: {validate(path)}")
    try:
        for line in reader_nodes(path):
            print(f"   ome-zarr-py: {line}")
    except Exception as exc:
        print(f"   ome-zarr-py: FAILED {type(exc).__name__}: {exc}")
    mask = path / "labels" / "mask" / "0"
    if mask.exists():
        ms, chunks = read_time_ms(mask)
        shape = zarr.open_array(mask, mode="r").shape
        print(f"   full-res mask {shape}, chunks {chunks}: 512² read {ms:.1f} ms (median of {READS})")


def chunk_figure(mask: Path, sides: tuple[int, ...] = (16384, 2048, 1024)) -> None:
    """512² read time of ``mask`` stored at each chunk side (zstd level 3, as segpipe)."""
    from zarr.codecs import ZstdCodec

    source = da.from_zarr(str(mask))
    with tempfile.TemporaryDirectory() as tmp:
        for side in sides:
            copy = Path(tmp) / f"c{side}"
            target = zarr.create_array(copy, shape=source.shape, dtype=source.dtype, chunks=(side, side),
                                       compressors=(ZstdCodec(level=3),), fill_value=0)  # fmt: skip
            da.store(source.rechunk((side, side)), target, lock=False)
            ms, _ = read_time_ms(copy)
            print(f"   {source.shape} in {side}² chunks: 512² read {ms:.1f} ms (median of {READS})")


def main(folders: list[str]) -> None:
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.zarr")):
            if (path / "zarr.json").exists() and "segpipe" in zarr.open_group(path, mode="r").attrs:
                report(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--chunks"]:
        chunk_figure(Path(sys.argv[2]))
    else:
        main(sys.argv[1:] or ["demo-out"])
