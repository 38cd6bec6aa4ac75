"""The model card: what a checkpoint says about its model (architecture and config,
classes, normalisation, scale, halo, threshold, data and licence), read from the
safetensors metadata without building the model. Torch-free: the driver, the scheduler
and the flows read cards; only workers and training build models
(`pipeline.models.checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from pipeline.errors import CheckpointError

CARD_KEY = "segpipe.card"
SHIPPED_DIR = Path(__file__).parent / "weights"


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
        known = {f.name for f in fields(cls)}
        missing = {"arch", "config"} - set(raw)
        if missing:
            raise CheckpointError(f"{source}: model card lacks {sorted(missing)}")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @property
    def multiple(self) -> int:
        """The model's total downsampling, 2^depth: what `SegmentationModel.multiple` of the
        model this card builds is (every model records its `filters`, one per depth + 1)."""
        return 2 ** (len(self.config["filters"]) - 1)


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
    minimal card and need arch= at load time)."""
    path = Path(path)
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


