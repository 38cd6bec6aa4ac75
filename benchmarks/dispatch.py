"""Ray dispatch: how many tiles/s one driver pushes through scheduler + RayBackend when the
tiles cost nothing (no-op runner: no read, no model, no write), beside Ray's own actor-call
rate; then one image with a tiny U-Net on 1 vs 2 CPU actors. Every figure is measured in
this process, on a local Ray of --cpus CPUs.

Usage: python benchmarks/dispatch.py [--tiles 5000] [--cpus 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image as PILImage

from pipeline import stages
from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.scheduler import run_tiles
from pipeline.engine.tiling import Tile, plan_tiles
from pipeline.job import ImageJob, TileReport, TileStatus
from pipeline.models import build_model, checkpoint
from pipeline.store import OutputStore
from pipeline.workers import RayBackend, RemoteTileWorker

NOOP_TILE = 16  # tile side of the no-op image: only the grid's size matters
IMAGE_HW = (2560, 2560)  # the tiny-model image: 100 tiles of 256
REPEATS = 2  # the image is run this often on the same warm actors; the best time counts
IMAGE_TILE = 256


class NoopRunner:
    """A runner that reports every tile DONE without reading, computing or writing."""

    def __init__(self, model_path: str, config: RunConfig):
        pass

    def run(self, job: ImageJob, tile: Tile, attempt: int) -> TileReport:
        return TileReport(tile.index, TileStatus.DONE)


def warm(backend: RayBackend, actors: int) -> None:
    """Block until every actor answered its first ping (process and model are up)."""
    while backend.slots < 2 * actors:
        backend.wait(0.05)


def noop_dispatch(root: Path, tiles: int, actors: int) -> float:
    """Tiles/s through run_tiles + RayBackend with no-op actors."""
    side = int(np.ceil(np.sqrt(tiles))) * NOOP_TILE
    path = root / "noop.zarr"
    store = OutputStore.create_or_open(
        path, image_id="noop", full_hw=(side, side), work_hw=(side, side), tile=NOOP_TILE,
        full_chunk=NOOP_TILE, classes=["fg"], provenance={},
    )  # fmt: skip
    job = ImageJob("noop", "", str(path), (side, side), (side, side), NOOP_TILE, 0)
    todo = plan_tiles(job.work_hw, NOOP_TILE)
    config = RunConfig(tile=NOOP_TILE, workers=actors)
    with RayBackend.start("no-model", config, runner=NoopRunner) as backend:
        warm(backend, actors)
        start = time.perf_counter()
        counts = run_tiles(job, todo, backend, store, retries=0)
        seconds = time.perf_counter() - start
    assert counts["done"] == len(todo), counts
    return len(todo) / seconds


def ray_call_rate(calls: int, actors: int) -> float:
    """Ray's own rate for one-tile calls to no-op actors, all submitted at once, then
    gathered: the ceiling of any one-call-per-tile dispatch."""
    handles = [RemoteTileWorker.options(num_cpus=0).remote("no-model", RunConfig(), None, NoopRunner)
               for _ in range(actors)]  # fmt: skip
    ray.get([h.ping.remote() for h in handles])
    job = ImageJob("noop", "", "", (16, 16), (16, 16), 16, 0)
    tile = plan_tiles((16, 16), 16)[0]
    start = time.perf_counter()
    ray.get([handles[i % actors].run.remote(job, [(tile, 1)]) for i in range(calls)])
    seconds = time.perf_counter() - start
    for h in handles:
        ray.kill(h)
    return calls / seconds


def model_image(root: Path) -> tuple[str, str]:
    """A tiny U-Net checkpoint and a smooth RGB PNG, written under root."""
    torch.manual_seed(0)
    net = build_model("unet", in_channels=3, classes=1, filters=[4, 8, 16])
    model = str(root / "tiny.safetensors")
    checkpoint.save(net, ModelCard(arch="", config={}), model)
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (IMAGE_HW[0] // 32, IMAGE_HW[1] // 32, 3), dtype=np.uint8)
    image = str(root / "image.png")
    PILImage.fromarray(coarse).resize(IMAGE_HW[::-1], PILImage.BILINEAR).save(image)
    return model, image


def image_seconds(root: Path, model: str, image: str, actors: int, threads: int) -> float:
    """Best seconds for one image's tiles on `actors` warm actors of `threads` torch threads."""
    config = RunConfig(tile=IMAGE_TILE, precision="fp32", exports=())
    job = stages.ingest(image, model, config, str(root / f"out-{actors}x{threads}"))
    store = OutputStore.open(job.store_path, mode="r+")
    handles = [RemoteTileWorker.options(num_cpus=threads).remote(model, config, threads)
               for _ in range(actors)]  # fmt: skip
    with RayBackend(handles) as backend:
        warm(backend, actors)
        best = float("inf")
        for _ in range(REPEATS):  # a repeat rewrites the same chunks
            start = time.perf_counter()
            counts = run_tiles(job, plan_tiles(job.work_hw, job.tile), backend, store, retries=0)
            best = min(best, time.perf_counter() - start)
            assert counts["done"] == counts["total"], counts
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=5000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="500 no-op tiles, no tiny-model image")
    args = parser.parse_args()
    if args.quick:
        args.tiles = 500
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="segpipe-dispatch-") as tmp:
        root = Path(tmp)
        raw = ray_call_rate(args.tiles, 2)
        noop = {n: noop_dispatch(root / f"noop{n}", args.tiles, n) for n in (1, 2)}
        if not args.quick:
            model, image = model_image(root)
            scaling = {(actors, threads): image_seconds(root, model, image, actors, threads)
                       for actors, threads in ((1, 1), (2, 1), (1, 2))}
    n_tiles = len(plan_tiles(IMAGE_HW, IMAGE_TILE))
    print(f"Ray {ray.__version__}, local cluster of {args.cpus} CPUs, {args.tiles} no-op tiles")
    print("dispatch (no-op runner)                      tiles/s")
    print(f"  Ray alone, 1 tile per call, 2 actors     {raw:8.0f}")
    for n, rate in noop.items():
        print(f"  run_tiles + RayBackend, {n} actor(s)        {rate:8.0f}   ({rate / raw:.2f}x Ray alone)")
    if not args.quick:
        print(f"tiny U-Net [4,8,16], {IMAGE_HW[0]}x{IMAGE_HW[1]} image, {n_tiles} tiles of {IMAGE_TILE}, fp32")
        print(f"actors x threads   seconds  tiles/s  speed-up vs 1x1   (best of {REPEATS}, warm actors)")
        one = scaling[(1, 1)]
        for (actors, threads), seconds in scaling.items():
            print(f"  {f'{actors} x {threads}':15s} {seconds:8.2f} {n_tiles / seconds:8.1f}  {one / seconds:6.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
