"""lung-xray checkpoints on the recipe's held-out Shenzhen split and the V7 film, side by
side: Dice at full resolution without and with post-processing, and the QC pass rate
under one card's ranges (docs/training.md quotes its output).

    python -m benchmarks.lung_heldout --data ../shared/data/real OLD.safetensors NEW.safetensors

Post-processing and QC ranges are the last checkpoint's card's for every checkpoint, so an
older model without them is scored with the same steps.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline import qc
from pipeline.cards import read_card
from pipeline.train.loop import torch_threads, validation_set
from recipes.calibrate import heldout_rows, summary
from recipes.shipped import recipe

V7 = ("cxr-txrv/16747_3_1.jpg", "cxr-txrv/16747_3_1_lungmask_v7labs.jpg")


def score(path: Path, data: Path, reference: Path) -> dict:
    """Held-out summary and V7 Dice of one checkpoint under `reference`'s card's steps."""
    card = read_card(reference)
    config = recipe("lung-xray", data, "/tmp")
    with torch_threads(1):
        rows = heldout_rows(path, validation_set(config), card.postprocess)
        v7 = validation_set(replace(config, val_images=str(data / V7[0]), val_masks=str(data / V7[1]),
                                    val_names=()))
        v7_row = heldout_rows(path, v7, card.postprocess)[0]
    flagged = [r["image"] for r in rows if qc.judge(r, card.qc).flagged]
    return {"model": str(path), **summary(rows, len(flagged)),
            "dice_min": round(float(np.min([r["dice"] for r in rows])), 4),
            "v7_dice": round(v7_row["dice"], 4), "v7_dice_postprocessed": round(v7_row["dice_postprocessed"], 4),
            "v7_qc": qc.judge(v7_row, card.qc).verdict, "flagged": flagged}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args()
    for path in args.models:
        print(json.dumps(score(path, args.data, args.models[-1])), flush=True)


if __name__ == "__main__":
    main()
