"""`python -m recipes NAME --data DIR [--out OUT]`: train a shipped model from its recipe
and choose its default UNet++ mode; writes OUT/NAME.safetensors (copy it to pipeline/weights/
to ship it), its resumable state and, for slide models, the labels under OUT/labels/."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.errors import ConfigError
from recipes.shipped import RECIPES, recipe, train_and_choose_mode


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m recipes",
        description="Train a shipped model from its recipe and choose its default UNet++ mode.")
    parser.add_argument("name", metavar="NAME", help=f"the shipped model: {', '.join(RECIPES)}")
    parser.add_argument("--data", required=True, type=Path,
                        help="the real-data folder the recipe reads (e.g. ../shared/data/real)")
    parser.add_argument("--out", default=Path("runs/train"), type=Path,
                        help="folder for the checkpoint, its state and labels (default: runs/train)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder")
    try:
        config = recipe(args.name, args.data, args.out)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return train_and_choose_mode(config)


if __name__ == "__main__":
    main()
