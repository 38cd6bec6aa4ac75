"""Checkpoints: safetensors weights with a JSON model card in the file's metadata.

Loading never executes code from a file: safetensors has no code path, and `.pt/.pth`
files go through `torch.load(weights_only=True)`, which refuses pickled callables. Nor does
it allocate what a file asks for before checking it: the card's bounds when it is read, then
the weights' names and shapes against the model the card builds on the meta device.
Plain state_dicts of the classic reference networks (the PyTorch U-Net with `inc`/`down1`/
`up1`/`outc` keys, and NestedUNet with `conv{i}_{j}` / `final{k}` keys) are imported by
renaming their keys; those networks upsample with align_corners=True, so the import sets it.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.cards import CARD_KEY, ModelCard, read_card
from pipeline.errors import CheckpointError, ConfigError
from pipeline.models import SegmentationModel, build_model


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, independent of file layout and metadata."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(model: SegmentationModel, card: ModelCard, path: str | Path) -> ModelCard:
    """Write weights + card; returns the card with arch, config and weights_sha256 filled."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    card.arch, card.config = model.arch, dict(model.config)
    card.validate(str(path))  # a card that read_card would refuse is not written
    card.weights_sha256 = weights_sha256(state)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={CARD_KEY: card.to_json()})
    return card


# The most parameters a checkpoint may build (2 GiB of float32), counted on the meta device
# before anything is allocated; the shipped models have under 600k, a full-size U-Net 31M.
MAX_PARAMETERS = 1 << 29


def load(path: str | Path, arch: str | None = None, **config: Any) -> tuple[SegmentationModel, ModelCard]:
    """Load a model in eval mode and its card. `config` overrides the card's (e.g. mode,
    prune_level); `arch` and `config` are required for plain reference state_dicts.

    Nothing the file asks for is allocated before it is checked: the card's bounds when it
    is read (cards.ModelCard.validate), then the weights' shapes (from the safetensors
    header, before any tensor is read) against the model the card builds on the meta
    device, which allocates nothing; only then are the weights read and the model built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        card = read_card(path)
        if arch is not None and arch != card.arch:
            raise CheckpointError(f"{path}: checkpoint is {card.arch!r}, not {arch!r}")
        card.config = {**card.config, **config}
        _check_shapes(path, card, _header_shapes(path))
        state = _read_safetensors(path, card)
    else:
        state, card = _read_torch(path, arch, config)
        card.config = {**card.config, **config}
        _check_shapes(path, card, {k: tuple(v.shape) for k, v in state.items()})
    model = _build(path, card)
    model.load_state_dict(state, strict=True)
    return model.eval(), card


def _build(path: Path, card: ModelCard) -> SegmentationModel:
    try:
        return build_model(card.arch, **card.config)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _check_shapes(path: Path, card: ModelCard, found: dict[str, tuple[int, ...]]) -> None:
    """Refuse weights whose names or shapes differ from the model `card` builds, and models
    over MAX_PARAMETERS, from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in _build(path, card).state_dict().items()}
    params = sum(math.prod(shape) for shape in expected.values())
    if params > MAX_PARAMETERS:
        raise CheckpointError(f"{path}: {card.arch} {card.config} has {params} parameters, "
                              f"more than {MAX_PARAMETERS}")  # fmt: skip
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} != {expected[k]}" for k in sorted(set(found) & set(expected))
             if tuple(found[k]) != expected[k]]  # fmt: skip
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: weights do not fit {card.arch} {card.config}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {wrong[:4]}"
        )


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header; no tensor is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _read_safetensors(path: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    actual = weights_sha256(state)
    if card.weights_sha256 and card.weights_sha256 != actual:
        raise CheckpointError(f"{path}: weights sha256 {actual[:12]} does not match its card")
    return state


def _read_torch(path: Path, arch: str | None, config: dict[str, Any]) -> tuple[dict, ModelCard]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: refused to load (only plain tensors are accepted; no code is run): {first}"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if arch is None:
        raise CheckpointError(f"{path}: a plain state_dict needs arch= and its config")
    if _is_reference(state, arch):
        state = REFERENCE_RENAMES[arch](state)
        config = {"align_corners": True, **config}
        if arch == "unetpp":
            config.setdefault("deep_supervision", "heads.1.conv.weight" in state)
    card = ModelCard(arch=arch, config=config, name=path.stem, data="imported state_dict")
    return state, card


def _is_reference(state: dict, arch: str) -> bool:
    marker = {"unet": "inc.double_conv.0.weight", "unetpp": "conv0_0.conv1.weight"}[arch]
    return marker in state


def _rename_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def rename(key: str) -> str:
        key = re.sub(r"^down(\d+)\.", lambda m: f"downs.{int(m[1]) - 1}.", key)
        return re.sub(r"^up(\d+)\.", lambda m: f"ups.{int(m[1]) - 1}.", key)

    return {rename(k): v for k, v in state.items()}


# NestedUNet's VGGBlock names conv1, bn1, conv2, bn2; our DoubleConv is one Sequential.
_VGG_PARTS = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4"}


def _rename_unetpp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def rename(key: str) -> str:
        if m := re.match(r"^conv(\d+)_(\d+)\.(conv1|bn1|conv2|bn2)\.(.+)$", key):
            return f"nodes.x_{m[1]}_{m[2]}.double_conv.{_VGG_PARTS[m[3]]}.{m[4]}"
        if m := re.match(r"^final(\d*)\.(.+)$", key):
            return f"heads.{int(m[1]) - 1 if m[1] else 0}.conv.{m[2]}"
        return key

    return {rename(k): v for k, v in state.items()}


REFERENCE_RENAMES = {"unet": _rename_unet, "unetpp": _rename_unetpp}
