"""TrainConfig: everything one training run needs, checked when it is made.

Torch-free, so the command line can build its options from the dataclass without loading
torch. The loop (pipeline.train.loop) reads it; the state file (pipeline.train.state)
compares its course-setting fields on resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import ConfigError
from pipeline.train.augment import Augment

Optimizer = Literal["adamw", "rmsprop"]
Schedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the CLI maps its options one to one onto these.

    Data: `images` and `masks` are two folders (paired by name) or two files; `val_images`
    and `val_masks` likewise, else validation uses the training images (and says so).
    `train_names` / `val_names` keep only those image names (stems) of each folder: a
    recorded split of one folder (recipes.shipped's lung split).
    Scale: `size` (h, w) resizes whole images (X-rays); else `mpp` picks the slide level and
    patches of `patch` px are sampled from it (`image_mpp` for files without a pixel size).
    """

    images: str
    masks: str
    out: str = "runs/train"
    name: str = "model"
    val_images: str | None = None
    val_masks: str | None = None
    val_tiles: int = 8  # validation patches per large image
    # a fixed split of one folder: the image names (stems) to train on / validate on; empty: all
    train_names: tuple[str, ...] = ()
    val_names: tuple[str, ...] = ()
    # model
    arch: str = "unetpp"
    filters: tuple[int, ...] = (8, 16, 32, 64, 128)
    in_channels: int = 3
    classes: int = 1
    class_names: tuple[str, ...] = ("foreground",)
    modalities: tuple[str, ...] = ()  # DICOM Modality values the card accepts (): any
    selection: tuple[str, ...] = ()  # the card's default selection rules (pipeline.selection): (): every image
    deep_supervision: bool = True
    checkpointing: bool = False  # activation checkpointing: less memory, ~30% more time
    # data at the model's scale
    size: tuple[int, int] | None = None
    mpp: float | None = None
    image_mpp: float | None = None
    patch: int = 256
    foreground_bias: float = 0.0
    normalization: dict[str, Any] = field(
        default_factory=lambda: {"kind": "percentile", "low": 1, "high": 99})
    augment: Augment = field(default_factory=Augment)
    # optimisation
    epochs: int = 50
    steps_per_epoch: int = 20
    batch_size: int = 4
    optimizer: Optimizer = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    warmup_epochs: int = 1
    ema: float = 0.0  # decay of the weights' exponential moving average per step; 0: off
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    # CPU threads for torch (None: torch's default). On a shared machine 1 is much faster
    # than 2: OpenMP threads that wait on a busy core spin (measured 0.9 s vs 7 s per step)
    threads: int | None = None
    workers: int = 1  # > 1: Ray Train TorchTrainer with DDP
    ray_address: str | None = None
    resume: bool = False
    # warm start: a checkpoint (safetensors with card) whose weights initialise the model
    # instead of `seed`'s random draw; same architecture and shapes, or the run refuses
    init_weights: str | None = None
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    # card
    data: str = ""
    license: str = ""
    threshold: float = 0.5
    # the card's post-processing of the working-level mask (pipeline.postprocess): e.g.
    # {"keep_largest": 2, "fill_holes": True, "min_area_fraction": 0.01}; {}: none
    postprocess: dict[str, Any] = field(default_factory=dict)
    mode: str = "accurate"  # UNet++ default inference mode written to the card
    prune_level: int | None = None
    tile: int | None = None
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.mpp is not None:
            raise ConfigError("give the model's scale as size or mpp, not both")
        for name in ("epochs", "steps_per_epoch", "batch_size", "workers", "patch", "val_tiles"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "rmsprop"):
            raise ConfigError(f"optimizer must be adamw or rmsprop, got {self.optimizer=}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"schedule must be cosine or constant, got {self.schedule=}")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema decay must be in [0, 1), got {self.ema=}")
        if not 0.0 <= self.foreground_bias <= 1.0:
            raise ConfigError(f"foreground_bias must be in [0, 1], got {self.foreground_bias=}")
        names = 1 if self.classes == 1 else self.classes - 1
        if len(self.class_names) != names:
            raise ConfigError(f"{self.classes=} needs {names} foreground class_names, "
                              f"got {list(self.class_names)}")
        if set(self.train_names) & set(self.val_names):
            raise ConfigError("train_names and val_names overlap: "
                              f"{sorted(set(self.train_names) & set(self.val_names))[:5]}")
        if self.augment.photometric and self.normalization.get("kind") == "meanstd":
            raise ConfigError("photometric augmentation needs [0, 1] inputs: use percentile or "
                              "scale normalisation, or turn brightness/contrast/gamma/hsv/stain off")

    @property
    def scale(self) -> dict[str, Any] | None:
        if self.size is not None:
            return {"size": [int(s) for s in self.size]}
        return {"mpp": float(self.mpp)} if self.mpp is not None else None

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out) / f"{self.name}.safetensors"

    @property
    def state_path(self) -> Path:
        return Path(self.out) / f"{self.name}.state.pt"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
