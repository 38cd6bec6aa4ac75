"""QC verdicts of a lung model through the engine (pipeline.segment, one process): the
recipe's held-out Shenzhen X-rays, and any other images given (the V7 film, other chest
films, a leg radiograph). Prints one JSON line per image and the pass rate per group.

    python -m benchmarks.lung_qc --data ../shared/data/real [--model lung-xray] [EXTRA ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline import cards
from pipeline.engine.pool import local_pool
from pipeline.local import segment
from pipeline.store import OutputStore
from recipes.shipped import SHENZHEN, recipe


def verdicts(images: list[Path], model: str, out: Path) -> list[dict]:
    """Each image segmented (no exports) and its store's QC verdict; the model loaded once."""
    rows = []
    model = str(cards.resolve(model))
    with local_pool(model, _config()) as pool:
        for image in images:
            start = time.perf_counter()
            store = OutputStore.open(segment(image, model, out, pool=pool, exports=(), allow_modality=True))
            qc = store.summary()["qc"]
            rows.append({"image": image.name, "verdict": qc["verdict"], "reasons": qc["reasons"],
                         "measures": qc["measures"], "seconds": round(time.perf_counter() - start, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _config():
    from pipeline.config import RunConfig

    return RunConfig(exports=(), allow_modality=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="lung-xray")
    parser.add_argument("extra", type=Path, nargs="*", help="other images, reported on their own")
    args = parser.parse_args()
    config = recipe("lung-xray", args.data, "/tmp")
    heldout = [args.data / SHENZHEN / "images" / f"{name}.jpg" for name in config.val_names]
    with tempfile.TemporaryDirectory() as out:
        for group, images in (("held-out", heldout), ("other", args.extra)):
            if images:
                rows = verdicts(images, args.model, Path(out) / group)
                passed = sum(r["verdict"] == "pass" for r in rows)
                print(json.dumps({"group": group, "images": len(rows), "pass": passed,
                                  "pass_rate": round(passed / len(rows), 4)}), flush=True)


if __name__ == "__main__":
    main()
