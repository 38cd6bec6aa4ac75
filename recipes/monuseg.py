"""MoNuSeg for the nuclei-he recipe: organs, the fixed held-out split, and 3-class labels.

The folder (../shared/data/real/he-nuclei-monuseg-30, its README) holds the 30 training
tiles of MoNuSeg 2018 (1000x1000 at 40x, 0.252 µm/px) with masks of nucleus interiors
whose boundaries were removed, so touching nuclei are separate connected components.

  ORGANS            tile -> organ, as the MoNuSeg challenge lists them (its "liver" tiles
                    carry TCGA lung project codes; the challenge's word is kept)
  monuseg_split     (train, held-out): the alphabetically last tile of each organ held out
  three_class       a mask -> 0 background / 1 nucleus interior / 2 boundary ring
  write_labels      the 3-class label PNGs of every tile, for the training readers

A boundary class (Kumar et al. 2017 trained their CNN the same way) keeps touching nuclei
apart in the prediction: instances are the interior's components, grown into the ring
(pipeline.instances). Used by recipes.shipped; the library never imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from scipy import ndimage
from skimage import measure, morphology

MONUSEG = "he-nuclei-monuseg-30"
MONUSEG_MPP = 0.252  # µm/px at 40x, per the MoNuSeg annotations (the JPEGs record none)
RING_PX = 2  # boundary ring width at 40x: covers the 1-2 px gaps between touching nuclei

# The MoNuSeg 2018 training set's organ list (by TCGA tissue-source site)
_SITES = {
    "breast": ("A7", "AR", "E2"), "kidney": ("B0", "HE"),
    "liver": ("18", "21", "38", "49", "50"), "prostate": ("G9", "CH"),
    "bladder": ("DK", "G2"), "colon": ("AY", "NH"), "stomach": ("KB", "RD"),
}


def organ(name: str) -> str:
    """The organ of a tile named TCGA-<site>-..."""
    site = name.split("-")[1]
    for found, sites in _SITES.items():
        if site in sites:
            return found
    raise ValueError(f"{name}: TCGA site {site} is not one of MoNuSeg's organs")


def monuseg_split(names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, held-out) tile names: the alphabetically last tile of each organ is held
    out (7 of 30, every organ once), never trained on. A fixed rule on the names."""
    by_organ: dict[str, list[str]] = {}
    for name in sorted(names):
        by_organ.setdefault(organ(name), []).append(name)
    held = {tiles[-1] for tiles in by_organ.values()}
    return tuple(n for n in sorted(names) if n not in held), tuple(n for n in sorted(names) if n in held)


def instances_of(mask: np.ndarray) -> np.ndarray:
    """Ground-truth instances of a MoNuSeg interior mask: its 4-connected components
    (the removed boundaries may leave diagonal touches, which 8-connectivity would merge)."""
    return measure.label(mask > 0, connectivity=1).astype(np.int32)


def three_class(mask: np.ndarray) -> np.ndarray:
    """0 background, 1 interior (the mask), 2 the ring of RING_PX around every nucleus,
    which fills the removed boundaries between touching nuclei."""
    inside = mask > 0
    ring = ndimage.binary_dilation(inside, morphology.disk(RING_PX)) & ~inside
    return (inside.astype(np.uint8) + 2 * ring.astype(np.uint8)).astype(np.uint8)


def write_labels(folder: Path, out: Path) -> Path:
    """The 3-class label PNG (values 0/1/2) of every mask in `folder`/masks, under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted((folder / "masks").glob("*.png")):
        target = out / path.name
        if not target.exists():
            PILImage.fromarray(three_class(np.asarray(PILImage.open(path)))).save(target)
    return out
