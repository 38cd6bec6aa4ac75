"""`segpipe train`: one option per TrainConfig field, generated from the dataclass, so the
command line and the training settings cannot drift apart.

Options left out keep TrainConfig's default, or the recipe's value with --recipe (the
settings that trained a shipped model; its data from --data). Tuples are comma-separated
("8,16,32,64"; a size also as "256x256"); dict and Augment settings are JSON.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional

import typer

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
    "data": "Data description for the model card.",
    "license": "Licence text for the model card.",
    "mode": "UNet++ inference mode written to the card: accurate or fast.",
}


def train_command(run: Callable[[Callable[[], Any]], None]) -> Callable[..., None]:
    """The `train` command function: calls `run` with a function that builds the
    TrainConfig from the command's options (so `run` decides how its errors exit)."""
    from pipeline.train.loop import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in POSITIONAL]
    params = [
        inspect.Parameter("images", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                          annotation=Annotated[Optional[str], typer.Argument(
                              help="Training images: a folder (paired with MASKS by name) or one large image.",
                              show_default=False)]),
        inspect.Parameter("masks", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                          annotation=Annotated[Optional[str], typer.Argument(
                              help="Masks: a folder or one file (0/255 or label values).", show_default=False)]),
        inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[Optional[str], typer.Option(
                              help="Start from the settings of a shipped model: lung-xray, tissue-he, nuclei-he.")]),
        inspect.Parameter("recipe_data", inspect.Parameter.KEYWORD_ONLY, default=None,
                          annotation=Annotated[Optional[str], typer.Option(
                              "--recipe-data", help="The real-data folder a recipe reads (default: ../shared/data/real).")]),
        *[inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                            annotation=_option(f, hints[f.name])) for f in fields],
    ]  # fmt: skip

    def train(**options: Any) -> None:
        run(lambda: train_config(options, {f.name: hints[f.name] for f in fields}))

    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params}
    train.__doc__ = """Train a U-Net / UNet++ on image/mask pairs or on large images with masks; writes
    OUT/NAME.safetensors (the best checkpoint by validation Dice, with its model card) and a
    resumable state. Use the checkpoint with `segpipe run --model OUT/NAME.safetensors`."""
    return train


def train_config(options: dict[str, Any], hints: dict[str, Any]) -> Any:
    """A TrainConfig from a recipe or the defaults, with the options that were given."""
    from pipeline import recipes
    from pipeline.train.loop import TrainConfig

    recipe, data = options.pop("recipe"), options.pop("recipe_data")
    given = {k: parse(v, hints.get(k), k) for k, v in options.items() if v is not None}
    if recipe is not None:
        base = recipes.recipe(recipe, data or recipes.DEFAULT_DATA, given.get("out", "runs/train"))
        return dataclasses.replace(base, **given)
    missing = [n for n in POSITIONAL if n not in given]
    if missing:
        raise typer.BadParameter(f"give IMAGES and MASKS, or --recipe (missing {', '.join(missing)})")
    return TrainConfig(**given)


def parse(value: Any, hint: Any, name: str) -> Any:
    """A command-line string as the field's type: tuples from comma lists, dicts and
    dataclasses (Augment) from JSON; other types are converted by typer already."""
    base = _unoptional(hint)
    origin = typing.get_origin(base)
    if not isinstance(value, str) or base in (str, None) or origin is typing.Literal:
        return value
    if origin is tuple:
        item = typing.get_args(base)[0]
        text = value.replace("x", ",") if item is int else value  # a size: 256x256
        try:
            return tuple(item(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise typer.BadParameter(f"{value!r}: {exc}", param_hint=f"--{name.replace('_', '-')}") from exc
    try:
        loaded = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{value!r} is not JSON ({exc})", param_hint=f"--{name.replace('_', '-')}") from exc
    return base(**loaded) if dataclasses.is_dataclass(base) else loaded


def _option(field: dataclasses.Field, hint: Any) -> Any:
    """The typer option of one field: its type where typer has one, else a string."""
    base = _unoptional(hint)
    flag = f"--{field.name.replace('_', '-')}"
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    shown = json.dumps(dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default)
    help_text = f"{HELP[field.name]} " if field.name in HELP else ""
    help_text += f"default: {shown}"
    if base is bool:
        return Annotated[Optional[bool], typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text,
                                                      rich_help_panel=PANEL, show_default=False)]
    if base in (int, float, str):
        return Annotated[Optional[base], typer.Option(flag, help=help_text, rich_help_panel=PANEL,
                                                      show_default=False)]
    choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else ()
    kind = f"one of {', '.join(choices)}" if choices else "comma list" if typing.get_origin(base) is tuple else "JSON"
    return Annotated[Optional[str], typer.Option(flag, help=f"{kind}; {help_text}", rich_help_panel=PANEL,
                                                 show_default=False)]


def _unoptional(hint: Any) -> Any:
    """X for X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint
