"""nuclei-he checkpoints on the recipe's held-out MoNuSeg tiles (one per organ): pixel Dice
and AJI of what a run delivers, per organ and mean (docs/training.md quotes its output).

    python -m benchmarks.nuclei_heldout --data ../shared/data/real OLD.safetensors NEW.safetensors
        [--grow 0 1 2] [--min-px 4 16] [--instances JSON] [--tta] [--write-card]
    python -m benchmarks.nuclei_heldout --data ../shared/data/real MODEL.safetensors --search \
        [--marker-prob 0.5 0.7 0.9] [--marker-dist 0 1 2] [--marker-px 1 8] [--flood distance prob]
        [--grow 0 1] [--min-px 8 32]

Each tile goes through `pipeline.segment` at MoNuSeg's 0.252 µm/px (the JPEGs record none),
so the figures are the delivered full-resolution outputs at 1000x1000: the nucleus class of
labels/mask (class 1) against the expert interiors for Dice; labels/nuclei against the
expert masks' 4-connected components (recipes.monuseg.instances_of) for AJI (Kumar et al.
2017). A model without instances (the previous, binary one) is scored on its mask's
connected components. `--grow`, `--min-px`: the card's instances.grow_px and min_px values to
try (a copy of the checkpoint per pair), to choose them on the split. `--write-card`: record the last model's
figures in its card (`metrics.heldout`) and the others' means in `metrics.compared`.

`--search`: the instance settings only, without re-running the model per setting: each tile
is segmented once with float32 probabilities (what the tile's instances are derived from
in a run: one 1024 tile holds the whole 1008² working level), then for the card's settings
and every watershed split (pipeline.instances.watershed_split) of the grid given the
instances are derived from them (pipeline.instances.derive), mapped to full resolution as
finalize does, and scored by AJI; one JSON line per setting, best mean AJI last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from skimage import measure

from pipeline import instances
from pipeline.local import segment
from pipeline.models import checkpoint
from pipeline.store import OutputStore
from recipes.monuseg import MONUSEG, MONUSEG_MPP, instances_of, monuseg_split, organ


def aji(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) of two instance label images: each true
    nucleus matched to the predicted one of highest IoU, intersections over unions summed,
    predicted nuclei matched to none added to the union."""
    t, p = truth.ravel().astype(np.int64), predicted.ravel().astype(np.int64)
    t_area = np.bincount(t, minlength=int(t.max()) + 1)
    p_area = np.bincount(p, minlength=int(p.max()) + 1)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(t[both] * (p.max() + 1) + p[both], return_counts=True)
    ti, pi = np.divmod(pairs, p.max() + 1)
    iou = inter / (t_area[ti] + p_area[pi] - inter)
    order = np.lexsort((-iou, ti))  # per true nucleus, best IoU first
    best = order[np.r_[True, ti[order][1:] != ti[order][:-1]]]
    used = np.zeros(len(p_area), bool)
    used[pi[best]] = True
    matched_c = inter[best].sum()
    matched_u = (t_area[ti[best]] + p_area[pi[best]] - inter[best]).sum()
    unmatched_true = t_area[1:].sum() - t_area[ti[best]].sum()
    unmatched_pred = p_area[1:][~used[1:]].sum()
    return float(matched_c / (matched_u + unmatched_true + unmatched_pred))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def score(model: Path, data: Path, work: Path, **run: object) -> dict:
    """Per held-out tile and organ, and the mean: Dice, AJI, instances found and true."""
    folder = data / MONUSEG
    _, held = monuseg_split(sorted(p.stem for p in (folder / "images").iterdir() if p.suffix == ".jpg"))
    rows, start = [], time.perf_counter()
    for name in held:
        out = segment(folder / "images" / f"{name}.jpg", model, work / model.stem, mpp=MONUSEG_MPP,
                      exports=(), precision="fp32", overwrite=True, **run)  # fmt: skip
        store = OutputStore.open(out)
        truth = np.asarray(PILImage.open(folder / "masks" / f"{name}.png")) > 0
        mask = np.asarray(store.mask[:])
        found = (np.asarray(store.instance_level(0)[:]) if store.layout.instances
                 else measure.label(mask == 1, connectivity=1))  # fmt: skip
        true_instances = instances_of(truth)
        rows.append({"tile": name, "organ": organ(name), "dice": round(dice(mask == 1, truth), 4),
                     "aji": round(aji(true_instances, found), 4), "found": int(found.max()),
                     "true": int(true_instances.max())})  # fmt: skip
    return {"model": str(model), "dice": round(float(np.mean([r["dice"] for r in rows])), 4),
            "aji": round(float(np.mean([r["aji"] for r in rows])), 4),
            "seconds": round(time.perf_counter() - start, 1), "tiles": rows}  # fmt: skip


def with_settings(model: Path, grow: int | None, min_px: int | None, folder: Path,
                  extra: dict | None = None) -> Path:
    """A copy of `model` whose card grows instances by `grow` px and drops seeds under
    `min_px` (None: the card's), its other instance settings updated with `extra`."""
    net, card = checkpoint.load(model)
    _, card_grow, card_min = instances.settings(card.instances)
    grow = card_grow if grow is None else grow
    min_px = card_min if min_px is None else min_px
    card.instances = {**card.instances, **(extra or {}), "grow_px": grow, "min_px": min_px}
    tag = "-split" if card.instances.get("split", "none") != "none" else ""
    path = folder / f"{model.stem}-grow{grow}-min{min_px}{tag}.safetensors"
    checkpoint.save(net, card, path)
    return path


def heldout_outputs(model: Path, data: Path, work: Path, **run: object) -> list[dict]:
    """Per held-out tile: the working-level probabilities (h, w, K, background first) of a
    run, its full-resolution mask and the expert instances."""
    folder = data / MONUSEG
    _, held = monuseg_split(sorted(p.stem for p in (folder / "images").iterdir() if p.suffix == ".jpg"))
    tiles = []
    for name in held:
        out = segment(folder / "images" / f"{name}.jpg", model, work / model.stem, mpp=MONUSEG_MPP,
                      exports=(), precision="fp32", prob_dtype="float32", overwrite=True, **run)  # fmt: skip
        store = OutputStore.open(out)
        fg = store.read_prob()
        probs = np.concatenate([1 - fg.sum(-1, keepdims=True), fg], axis=-1)
        truth = np.asarray(PILImage.open(folder / "masks" / f"{name}.png")) > 0
        tiles.append({"tile": name, "organ": organ(name), "probs": probs,
                      "mask": np.asarray(store.mask[:]), "truth": instances_of(truth)})
    return tiles


def score_instances(tiles: list[dict], spec: dict) -> dict:
    """Mean and per-organ AJI of the instances `spec` derives from the tiles' probabilities,
    at full resolution (nearest working-level pixel, kept where the mask is foreground)."""
    rows = []
    for t in tiles:
        ids = instances.derive(t["probs"], spec)
        (wh, ww), (fh, fw) = ids.shape, t["mask"].shape
        near = ids[np.ix_(instances.nearest_index(0, fh, wh, fh), instances.nearest_index(0, fw, ww, fw))]
        found = np.where(t["mask"] > 0, near, 0)
        rows.append({"organ": t["organ"], "aji": round(aji(t["truth"], found), 4),
                     "found": len(np.unique(found)) - 1, "true": int(t["truth"].max())})
    return {"aji": round(float(np.mean([r["aji"] for r in rows])), 4), "tiles": rows}


def search(model: Path, data: Path, grid: dict[str, list], tta: bool) -> list[dict]:
    """The card's instance settings, then each watershed split of `grid`, scored on the
    held-out tiles (one JSON line each); returns the results, best mean AJI last."""
    _, card = checkpoint.load(model)
    base = dict(card.instances) | {"split": "none"}
    specs = [base] + [base | {"split": "watershed"} | dict(zip(grid, values, strict=True))
                      for values in itertools.product(*grid.values())]
    with tempfile.TemporaryDirectory() as tmp:
        tiles = heldout_outputs(model, data, Path(tmp), tta=tta)
    results = []
    for spec in specs:
        results.append({"spec": spec, **score_instances(tiles, spec)})
        print(json.dumps(results[-1]), flush=True)
    return sorted(results, key=lambda r: r["aji"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--grow", type=int, nargs="*", default=[None])
    parser.add_argument("--min-px", type=int, nargs="*", default=[None])
    parser.add_argument("--write-card", action="store_true")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (RunConfig tta)")
    parser.add_argument("--instances", type=json.loads, default=None,
                        help='instance settings to set on the cards scored, as JSON (e.g. \'{"split": "watershed"}\')')
    parser.add_argument("--search", action="store_true",
                        help="score instance settings on one model's stored probabilities (no re-run per setting)")
    parser.add_argument("--marker-prob", type=float, nargs="*", default=[0.5, 0.7, 0.9])
    parser.add_argument("--marker-dist", type=float, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--marker-px", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--flood", nargs="*", default=["distance", "prob"])
    parser.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args()
    if args.search:
        grid = {"marker_prob": args.marker_prob, "marker_dist": args.marker_dist,
                "marker_px": args.marker_px, "flood": args.flood}
        grid |= {k: v for k, v in (("grow_px", args.grow), ("min_px", args.min_px)) if v != [None]}
        best = search(args.models[-1], args.data, grid, args.tta)[-1]
        print(json.dumps({"best": best}), flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            _, card = checkpoint.load(path)
            variants = ([with_settings(path, g, m, Path(tmp), args.instances) for g in args.grow for m in args.min_px]
                        if card.instances else [path])  # fmt: skip
            for variant in variants:
                results.append(score(variant, args.data, Path(tmp), tta=args.tta))
                print(json.dumps(results[-1]), flush=True)
    if args.write_card:
        write_card(args.models[-1], results[-1], results[:-1])


def write_card(path: Path, result: dict, others: list[dict]) -> None:
    """The held-out figures of `path` (and the means of the models compared) in its card."""
    net, card = checkpoint.load(path)
    organs = {t["organ"]: {k: t[k] for k in ("tile", "dice", "aji", "found", "true")} for t in result["tiles"]}
    card.metrics = {**card.metrics, "heldout": {
        "how": "python -m benchmarks.nuclei_heldout: pipeline.segment at 0.252 um/px, full resolution; Dice of "
               "class 1 (nucleus interior) vs the expert interiors, AJI of labels/nuclei vs their 4-connected "
               "components", "dice": result["dice"], "aji": result["aji"], "organs": organs,
        "instances": {**card.instances, "chosen": "by mean AJI on these same 7 held-out tiles (python -m "
                      "benchmarks.nuclei_heldout --search; docs/training.md): slightly optimistic"}},
        "compared": [{"model": Path(o["model"]).name, "dice": o["dice"], "aji": o["aji"]} for o in others]}
    checkpoint.save(net, card, path)


if __name__ == "__main__":
    main()
