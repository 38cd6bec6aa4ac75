"""Command-line options generated from a settings dataclass (RunConfig, TrainConfig): one
option per field, so a command and its settings cannot drift apart.

A field's option is `--field-name`; its help and --help panel come from the field's
metadata (RunConfig's `setting`) or from the caller. Every option defaults to None,
meaning "the dataclass default" (or a recipe's value), which the help text shows.
Types: bool -> --x/--no-x; int, float, str as they are; a Literal -> a choice (a bad value
is a usage error before anything runs); a tuple -> repeatable and comma-separated
("8,16,32", a size also "256x256"); dicts and nested dataclasses -> JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Optional

import typer

KEYWORD = inspect.Parameter.KEYWORD_ONLY
_LIST_SPLIT = re.compile(r",(?![^\[]*\])")  # commas, but not inside brackets ("Modality in [CR, DX]")


def generate(settings: type, *, skip: Iterable[str] = (), panel: str | None = None,
             help: dict[str, str] | None = None) -> list[inspect.Parameter]:  # fmt: skip
    """One keyword parameter, annotated as a typer option, per field of `settings` that is
    not skipped and not marked `cli=False` in its metadata."""
    hints = typing.get_type_hints(settings)
    return [
        inspect.Parameter(f.name, KEYWORD, default=None, annotation=_option(f, hints[f.name], panel, help or {}))
        for f in dataclasses.fields(settings)
        if f.name not in set(skip) and f.metadata.get("cli", True)
    ]  # fmt: skip


def given(settings: type, options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given, as the fields' types (None: not given)."""
    hints = typing.get_type_hints(settings)
    names = {f.name for f in dataclasses.fields(settings)}
    return {k: parse(v, hints[k], k) for k, v in options.items() if k in names and v is not None}


def command(function: Callable[..., Any], params: list[inspect.Parameter]) -> Callable[..., Any]:
    """`function(**options)` with the signature typer reads: `params`, in order."""
    function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    function.__annotations__ = {p.name: p.annotation for p in params}
    return function


def parse(value: Any, hint: Any, name: str) -> Any:
    """A command-line value as the field's type: tuples from repeated or comma-separated
    values, dicts and dataclasses from JSON; typer converts the other types already."""
    base = unoptional(hint)
    origin = typing.get_origin(base)
    if isinstance(value, enum.Enum):
        return value.value
    if origin is tuple:
        return _tuple(value, typing.get_args(base)[0], name)
    if not isinstance(value, str) or base in (str, None) or origin is typing.Literal:
        return value
    try:
        loaded = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{value!r} is not JSON ({exc})", param_hint=flag(name)) from exc
    return base(**loaded) if dataclasses.is_dataclass(base) else loaded


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def unoptional(hint: Any) -> Any:
    """X for X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _tuple(value: Any, item: type, name: str) -> tuple[Any, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    parts = [p.strip() for v in values for p in _LIST_SPLIT.split(v.replace("x", ",") if item is int else v)]
    if parts == ["none"]:  # an explicit empty list (e.g. --exports none)
        return ()
    try:
        return tuple(item(p) for p in parts if p)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r}: {exc}", param_hint=flag(name)) from exc


def _option(field: dataclasses.Field, hint: Any, panel: str | None, helps: dict[str, str]) -> Any:
    """The typer option of one field: its type where typer has one, else a string."""
    base = unoptional(hint)
    meta = field.metadata
    names = [flag(field.name), *meta.get("aliases", ())]
    text = helps.get(field.name) or meta.get("help", "")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    shown = json.dumps(dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default)
    # a None default means "decided later" (the model card, the image): the help says by what
    suffix = "" if default is None else f" [dim](default: {shown})[/]"
    common = {"help": f"{text}{suffix}".strip(), "show_default": False,
              "rich_help_panel": panel or meta.get("panel"), "envvar": meta.get("envvar")}  # fmt: skip
    if base is bool:
        return Annotated[Optional[bool], typer.Option(f"{names[0]}/--no-{names[0][2:]}", **common)]
    if typing.get_origin(base) is typing.Literal:
        # typer lists and checks an Enum's values (a bad one is a usage error, exit 2)
        choices = enum.Enum(field.name, {str(c): str(c) for c in typing.get_args(base)}, type=str)
        return Annotated[Optional[choices], typer.Option(*names, **common)]
    if base in (int, float, str):
        return Annotated[Optional[base], typer.Option(*names, **common)]
    if typing.get_origin(base) is tuple:
        common["help"] = f"Repeatable or comma-separated. {common['help']}"
        return Annotated[Optional[list[str]], typer.Option(*names, **common)]
    common["help"] = f"JSON. {common['help']}"
    return Annotated[Optional[str], typer.Option(*names, **common)]
