"""Exact tiling: max |Δprob| of `segment()` (crop blend) against whole-image inference of the
same model, by halo, and the pixels the tiles' windows compute per image pixel.

Tiny depth-4 U-Net and UNet++ with fixed random weights and randomised BatchNorm (so BN is
not the identity), fp32, tile 256, probabilities stored as float32, on the centre of the
real TCGA H&E slide (a synthetic image when it is absent). Halo 0 shows the seams plain
tiling leaves; the align_corners=True row shows why the models upsample with
align_corners=False (it is not translation-equivariant, so no halo makes it exact).

Usage: python benchmarks/exactness.py [--shape 1000 1300] [--tile 256] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import bench_image, cache_dir, in_worker_env, machine, table  # noqa: E402
from benchmarks.vs_monai import image_tensor  # noqa: E402
from pipeline.cards import ModelCard  # noqa: E402
from pipeline.engine.tiling import crop_windows, plan_tiles  # noqa: E402
from pipeline.local import segment  # noqa: E402
from pipeline.models import (
    build_model,  # noqa: E402
    checkpoint,  # noqa: E402
)
from pipeline.store import OutputStore  # noqa: E402
from tests.reference_nets import randomise_bn  # noqa: E402  (the tests' BN randomiser, shared)

FILTERS = [4, 8, 16, 32, 64]
HALOS = (0, 16, 32, 64, 128)
MODELS = {
    "U-Net": ("unet", {}),
    "UNet++": ("unetpp", {}),
    "U-Net, align_corners=True (reference weights)": ("unet", {"bilinear": True, "align_corners": True}),
}


def deltas(arch: str, config: dict, halos: tuple[int, ...], png: Path, tile: int, workdir: Path) -> list[float]:
    """Largest |tiled - whole image| probability over the image, fp32, for each halo."""
    torch.manual_seed(0)
    model = randomise_bn(build_model(arch, in_channels=3, classes=1, filters=FILTERS, **config))
    model_path = workdir / "model.safetensors"
    checkpoint.save(model, ModelCard(arch="", config={}, name="exactness"), model_path)
    with torch.inference_mode():
        whole = torch.sigmoid(model(image_tensor(str(png))))[0, 0].numpy()
    out = []
    for halo in halos:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        path = segment(png, model_path, workdir / "out", tile=tile, halo=halo, precision="fp32",
                       prob_dtype="float32", exports=())
        out.append(float(np.abs(OutputStore.open(path).read_prob()[..., 0] - whole).max()))
    return out


def window_pixels(shape: tuple[int, int], tile: int, halo: int, multiple: int = 16) -> float:
    """Pixels the crop windows of every tile compute, per image pixel."""
    total = sum(w.input.h * w.input.w for t in plan_tiles(shape, tile)
                for w in crop_windows(t, shape, halo, multiple, max_window=2048))
    return total / (shape[0] * shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=(1000, 1300))
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="400x520 image, tile 128, halos 0 and 64")
    args = parser.parse_args()
    in_worker_env()
    halos = (0, 64) if args.quick else HALOS
    if args.quick:
        args.shape, args.tile = (400, 520), 128
    shape = tuple(args.shape)
    pixels, source = bench_image(max(shape))
    workdir = cache_dir() / "exactness"
    workdir.mkdir(exist_ok=True)
    png = workdir / f"image-{shape[0]}x{shape[1]}.png"
    Image.fromarray(pixels[: shape[0], : shape[1]]).save(png)
    print(f"## Exact tiling: max abs Δprob against whole-image inference, {source} cut to "
          f"{shape[0]}x{shape[1]}, tile {args.tile}, fp32\n\nMachine: {machine()}\n")
    rows = [[name, *(f"{d:.1e}" for d in deltas(arch, config, halos, png, args.tile, workdir))]
            for name, (arch, config) in MODELS.items()]
    rows.append(["window pixels per image pixel",
                 *(f"{window_pixels(shape, args.tile, halo):.2f}" for halo in halos)])
    print(table(["halo", *map(str, halos)], rows))
    print("\nTiny depth-4 models (filters 4..64), seed 0, randomised BatchNorm; the last row counts the "
          "pixels every tile's windows compute (the halo's cost).")


if __name__ == "__main__":
    main()
