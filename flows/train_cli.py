"""`segpipe train`: one option per TrainConfig field, generated from the dataclass, so the
command line and the training settings cannot drift apart.

Options left out keep TrainConfig's default; types as flows.options makes them (tuples
comma-separated, "8,16,32,64", a size also "256x256"; dict and Augment settings JSON). The shipped models' settings are
not options here: their recipes live outside the installed package, in a checkout's
`recipes/` (`python -m recipes NAME --data DIR`, docs/training.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

from flows import options

PANEL = "Training settings (TrainConfig)"
POSITIONAL = ("images", "masks")
HELP = {
    "out": "Folder for the checkpoint, its card and the resumable state.",
    "name": "Checkpoint name: OUT/NAME.safetensors.",
    "val_images": "Validation images (folder or file); else the training images, as the log says.",
    "val_masks": "Validation masks.",
    "size": "Whole images resized to HxW (X-rays), e.g. 256x256.",
    "mpp": "Slides: the model's micrometres per pixel (picks the level patches come from).",
    "image_mpp": "Micrometres per pixel of inputs that do not record it.",
    "patch": "Side of the sampled training patches.",
    "workers": "More than 1: Ray Train workers with DDP.",
    "resume": "Continue from OUT/NAME.state.pt.",
    "init_weights": "Warm start: a checkpoint of the same architecture whose weights the model starts from.",
    "data": "Data description for the model card.",
    "license": "Licence text for the model card.",
    "mode": "UNet++ inference mode written to the card: accurate or fast.",
}


def train_command(run: Callable[[Callable[[], Any]], None]) -> Callable[..., None]:
    """The `train` command function: calls `run` with a function that builds the
    TrainConfig from the command's options (so `run` decides how its errors exit)."""
    from pipeline.train import TrainConfig

    params = [
        inspect.Parameter("images", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                          annotation=Annotated[Optional[str], typer.Argument(
                              help="Training images: a folder (paired with MASKS by name) or one large image.",
                              show_default=False)]),
        inspect.Parameter("masks", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                          annotation=Annotated[Optional[str], typer.Argument(
                              help="Masks: a folder or one file (0/255 or label values).", show_default=False)]),
        *options.generate(TrainConfig, skip=POSITIONAL, panel=PANEL, help=HELP),
    ]  # fmt: skip

    def train(**given: Any) -> None:
        run(lambda: train_config(given))

    train.__doc__ = """Train a U-Net / UNet++ on image/mask pairs or on large images with masks; writes
    OUT/NAME.safetensors (the best checkpoint by validation Dice, with its model card) and a
    resumable state. Use the checkpoint with `segpipe run --model OUT/NAME.safetensors`."""
    return options.command(train, params)


def train_config(given: dict[str, Any]) -> Any:
    """A TrainConfig from the defaults and the options that were given."""
    from pipeline.train import TrainConfig

    settings = options.given(TrainConfig, given)
    missing = [n for n in POSITIONAL if n not in settings]
    if missing:
        raise typer.BadParameter(f"give IMAGES and MASKS (missing {', '.join(missing)}); a shipped "
                                 "model's recipe runs from a checkout: python -m recipes NAME --data DIR")
    return TrainConfig(**settings)
