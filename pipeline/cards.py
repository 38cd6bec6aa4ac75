"""The model card: what a checkpoint says about its model (architecture and config,
classes, normalisation, scale, halo, threshold, post-processing, QC ranges, data and
licence), read from the safetensors metadata without building the model. Torch-free: the
driver, the scheduler and the flows read cards; only workers and training build models
(`pipeline.models.checkpoint`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from pipeline import instances, postprocess, qc
from pipeline.errors import CheckpointError, ConfigError

CARD_KEY = "segpipe.card"
SHIPPED_DIR = Path(__file__).parent / "weights"

# Sane bounds of what a card may ask for (checked when a card is read: a checkpoint is
# untrusted input, and a card value sizes arrays before any weight is looked at). A card
# with scale.size [200000, 200000] asked for a 4e10-pixel working level; filters up to
# 8192 built an 11.7 GB model. Limits: a real model outside them needs a code change.
MAX_SCALE_SIDE = 32768  # a working size side: 32768² is max_pixels' default (2^30)
MIN_SCALE_SIDE = 16  # below it a working pixel averages thousands of an X-ray's rows
MPP_RANGE = (0.01, 10_000.0)  # µm/px: 40x scanners ~0.12 ... a coarse X-ray at 1 cm
MAX_DEPTH = 7  # len(filters) - 1: a 128-pixel grid; the shipped models use 3 and 4
MAX_FILTER = 2048  # channels of one level; U-Net's widest is 1024
MAX_CLASSES = 255  # foreground classes in a uint8 mask (0 is background)
MAX_TILE = 16384
MAX_HALO = 1024
IN_CHANNELS = (1, 3)
MODALITY = re.compile(r"[A-Z0-9]{1,16}")  # a DICOM Modality (CS) value


@dataclass
class ModelCard:
    """What a user (and the engine) needs to run a model correctly.

    normalization: {"kind": "scale", "divisor": 255} | {"kind": "percentile", "low": 1,
        "high": 99} | {"kind": "meanstd", "mean": [...], "std": [...], "divisor": 255}.
    scale: the scale the model was trained at: {"mpp": 0.5} for slides, {"size": [512, 512]}
        for whole X-rays resized to a fixed size, or None for "the input's own pixels".
    """

    arch: str
    config: dict[str, Any]
    name: str = ""
    class_names: list[str] = field(default_factory=lambda: ["foreground"])
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "scale", "divisor": 255})
    scale: dict[str, Any] | None = None
    tile: int | None = None
    halo: int | None = None
    threshold: float = 0.5
    # DICOM Modality values the model was trained on ([]: any, and non-DICOM inputs carry
    # none): a DICOM of another modality is refused (a shoulder MR through the lung model
    # gave a confident 16 % "lung") unless the run says --allow-modality.
    modalities: list[str] = field(default_factory=list)
    # The images the model is for, as selection rules over DICOM attributes (pipeline.
    # selection; []: every image): a run skips, with the reason, a DICOM they do not select
    # (the lung model wrote a confident "lung" on a leg radiograph) unless it says --select.
    selection: list[str] = field(default_factory=list)
    # post-processing of the working-level mask before delivery (pipeline.postprocess):
    # {"min_area_fraction": 0.01, "keep_largest": 2, "fill_holes": true}; {}: none
    postprocess: dict[str, Any] = field(default_factory=dict)
    # QC thresholds (pipeline.qc): the plausible ranges of what a run measures, chosen on
    # validation data and said how in "how"; {}: every image passes, unchecked
    qc: dict[str, Any] = field(default_factory=dict)
    # instance output (pipeline.instances): {"name": "nuclei", "seed_class": 1, "grow_px": 2,
    # "min_px": 4} writes labels/<name> beside the mask; {}: none
    instances: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    license: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 3))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "card") -> ModelCard:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{source}: model card is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: model card is not a JSON object")
        known = {f.name for f in fields(cls)}
        missing = {"arch", "config"} - set(raw)
        if missing:
            raise CheckpointError(f"{source}: model card lacks {sorted(missing)}")
        card = cls(**{k: v for k, v in raw.items() if k in known})
        card.validate(source)
        return card

    def validate(self, source: str = "card") -> None:
        """Refuse (CheckpointError naming `source` and the value) a card outside the sane
        bounds above: a card is read from an untrusted file and sizes the working level,
        the tiles and the model before its weights are checked."""
        problems = _card_problems(self)
        if problems:
            raise CheckpointError(f"{source}: model card {'; '.join(problems)}")

    @property
    def multiple(self) -> int:
        """The model's total downsampling, 2^depth: what `SegmentationModel.multiple` of the
        model this card builds is (every model records its `filters`, one per depth + 1)."""
        return 2 ** (len(self.config["filters"]) - 1)


@dataclass(frozen=True)
class ModelId:
    """How an output names the model that made it (DICOM SEG's algorithm identification and
    series description). A card has no version of its own: the version is the first 12 hex
    digits of the weights' digest (the card's ``weights_sha256``, else the checkpoint
    file's), which changes exactly when the weights do."""

    name: str
    version: str

    @classmethod
    def from_provenance(cls, model: Mapping[str, Any]) -> ModelId:
        """From a store's provenance ``model`` section (path, sha256, card); a store written
        without a card falls back to the checkpoint's file name."""
        card = model.get("card") or {}
        name = card.get("name") or Path(str(model.get("path", ""))).stem or "unknown"
        digest = str(card.get("weights_sha256") or model.get("sha256") or "")
        return cls(name=str(name), version=digest[:12] or "unknown")


def shipped_models() -> dict[str, Path]:
    """The models that ship inside the package, by name."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.safetensors"))}


def resolve(model: str | Path) -> Path:
    """A shipped model name or a checkpoint path -> the checkpoint's path."""
    shipped = shipped_models()
    if str(model) in shipped:
        return shipped[str(model)]
    path = Path(model)
    if not path.is_file():
        raise CheckpointError(f"{model}: neither a checkpoint file nor a shipped model {sorted(shipped)}")
    return path


def read_card(path: str | Path) -> ModelCard:
    """The model card of a checkpoint, without building the model (plain state_dicts get a
    minimal card and need arch= at load time). Read and checked once per process and file
    version (real path, size, modification time): an archive run reads it for every image,
    and checking its selection rules against pydicom's dictionary took ~35 ms each time.
    Each caller gets its own copy."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return _read_card(path)  # its own error, on one line
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    with _CARDS_LOCK:
        card = _CARDS.get(key)
    if card is None:
        card = _read_card(path)
        with _CARDS_LOCK:
            _CARDS[key] = card
            while len(_CARDS) > 16:
                _CARDS.pop(next(iter(_CARDS)))
    return copy.deepcopy(card)


_CARDS: dict[tuple[str, int, int], ModelCard] = {}
_CARDS_LOCK = threading.Lock()


def _read_card(path: Path) -> ModelCard:
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only safetensors checkpoints carry a model card")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if CARD_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file has no segpipe model card")
    return ModelCard.from_json(metadata[CARD_KEY], str(path))


def _card_problems(card: ModelCard) -> list[str]:
    """What is wrong with a card, one phrase each naming the field and its value."""
    problems: list[str] = []
    config = card.config
    if not isinstance(config, dict):
        return [f"config must be an object, got {config!r:.80}"]
    problems += _filters_problems(config.get("filters"))
    in_channels = config.get("in_channels", 3)
    if in_channels not in IN_CHANNELS or isinstance(in_channels, bool):
        problems.append(f"config.in_channels={in_channels!r:.40} not in {IN_CHANNELS}")
    classes = config.get("classes", 1)
    if not _int_in(classes, 1, MAX_CLASSES + 1):  # + 1: multi-class outputs add background
        problems.append(f"config.classes={classes!r:.40} not in 1..{MAX_CLASSES + 1}")
    names = card.class_names
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES:
        problems.append(f"class_names must list 1..{MAX_CLASSES} names, got {names!r:.80}")
    problems += _scale_problems(card.scale)
    if card.tile is not None and not _int_in(card.tile, 16, MAX_TILE):
        problems.append(f"tile={card.tile!r:.40} not in 16..{MAX_TILE}")
    if card.halo is not None and not _int_in(card.halo, 0, MAX_HALO):
        problems.append(f"halo={card.halo!r:.40} not in 0..{MAX_HALO}")
    if not _number_in(card.threshold, 0.0, 1.0):
        problems.append(f"threshold={card.threshold!r:.40} not in [0, 1]")
    modalities = card.modalities
    if not (isinstance(modalities, list) and len(modalities) <= 16
            and all(isinstance(m, str) and MODALITY.fullmatch(m) for m in modalities)):  # fmt: skip
        problems.append(f"modalities={modalities!r:.80} must list DICOM Modality codes (CR, DX, ...)")
    problems += _selection_problems(card.selection)
    problems += postprocess.card_problems(card.postprocess, card.scale, classes)
    problems += qc.check_spec(card.qc)
    problems += instances.card_problems(card.instances, classes)
    return problems


def _selection_problems(selection: Any) -> list[str]:
    from pipeline.selection import parse_rules

    if not (isinstance(selection, list) and len(selection) <= 32 and all(isinstance(r, str) for r in selection)):
        return [f"selection={selection!r:.80} must list selection rules (e.g. 'Modality in [CR, DX]')"]
    try:
        parse_rules(selection)
    except ConfigError as exc:
        return [f"selection: {exc}"]
    return []


def _filters_problems(filters: Any) -> list[str]:
    if not isinstance(filters, list) or not 2 <= len(filters) <= MAX_DEPTH + 1:
        return [f"config.filters must list 2..{MAX_DEPTH + 1} widths, got {filters!r:.80}"]
    bad = [f for f in filters if not _int_in(f, 1, MAX_FILTER)]
    if bad:
        return [f"config.filters={filters!r:.80}: widths must be 1..{MAX_FILTER}, got {bad[0]!r:.40}"]
    return []


def _scale_problems(scale: Any) -> list[str]:
    if scale is None:
        return []
    if not isinstance(scale, dict):
        return [f"scale must be an object or null, got {scale!r:.80}"]
    problems = []
    if "size" in scale:
        size = scale["size"]
        if not (isinstance(size, list) and len(size) == 2
                and all(_int_in(v, MIN_SCALE_SIDE, MAX_SCALE_SIDE) for v in size)):  # fmt: skip
            problems.append(f"scale.size={size!r:.80} must be two ints in "
                            f"{MIN_SCALE_SIDE}..{MAX_SCALE_SIDE}")  # fmt: skip
    if "mpp" in scale and not _number_in(scale["mpp"], *MPP_RANGE):
        problems.append(f"scale.mpp={scale['mpp']!r:.40} not in [{MPP_RANGE[0]}, {MPP_RANGE[1]}] µm/px")
    return problems


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


MODES = ("accurate", "fast")  # UNet++ (Zhou 2018): mean of the heads, or one pruned head


def check_mode(mode: str, prune_level: int, depth: int, deep_supervision: bool) -> None:
    """The UNet++ mode rules (the model applies them when built; the driver, before a run):
    a mode of MODES, a prune level within the depth, and a pruned head only where deep
    supervision trained one."""
    if mode not in MODES:
        raise ConfigError(f"UNet++ mode must be one of {MODES} (got {mode!r})")
    if not 1 <= prune_level <= depth:
        raise ConfigError(f"prune_level must be in 1..{depth} for this model (got {prune_level})")
    if mode == "fast" and prune_level < depth and not deep_supervision:
        raise ConfigError(
            f"prune_level={prune_level} needs a head on X(0,{prune_level}): "
            "build the model with deep_supervision=True"
        )


def check_settings(card: ModelCard, mode: str | None, prune_level: int | None, where: str) -> None:
    """A run's model settings against the card's model, before anything runs: UNet++
    modes only for UNet++, within its depth (ConfigError naming the checkpoint)."""
    if mode is None and prune_level is None:
        return
    if card.arch != "unetpp":
        raise ConfigError(f"{where}: mode and prune_level are for UNet++ models; this one is {card.arch}")
    depth = len(card.config["filters"]) - 1
    chosen_mode = mode or card.config.get("mode", "accurate")
    chosen_level = prune_level if prune_level is not None else card.config.get("prune_level") or depth
    try:
        check_mode(chosen_mode, chosen_level, depth, bool(card.config.get("deep_supervision")))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
