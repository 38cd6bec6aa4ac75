"""The one typed settings object that flows from the CLI / Prefect flow to every worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from pipeline.errors import ConfigError

Blend = Literal["crop", "gaussian"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

# 2^30 pixels: larger than any single slide level we expect (~100k x 100k is 10^10, so
# whole-slide readers check per level lazily; this guards decoded-in-memory formats).
DEFAULT_MAX_PIXELS = 1 << 30
# Tile-addressable slides are never decoded whole: their level 0 is checked against this
# generous bound (2^36, ~262k x 262k) and each decoded tile/region against max_pixels.
DEFAULT_MAX_SLIDE_PIXELS = 1 << 36


@dataclass(frozen=True)
class FaultInjection:
    """Test-only faults, off by default: fail chosen tiles, kill an actor after n tiles."""

    fail_tiles: tuple[tuple[int, int], ...] = ()
    fail_attempts: int = 0  # the chosen tiles fail on their first k attempts (0 = always)
    exit_after: int | None = None  # a worker process exits after this many tiles

    @property
    def active(self) -> bool:
        return bool(self.fail_tiles) or self.exit_after is not None


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run: one model, one set of tiling/blending/precision choices."""

    tile: int = 1024
    halo: int | None = None  # None: the model card's halo, else 64
    blend: Blend = "crop"
    window: int = 512  # gaussian blend: the sliding window's side
    overlap: float = 0.25  # gaussian blend: fraction of a window shared with its neighbour
    max_window: int = 2048  # crop blend: a tile+halo larger than this is split into windows
    batch_size: int = 4  # windows per forward pass
    mode: str | None = None  # UNet++: "accurate" | "fast"; None: the model card's default
    prune_level: int | None = None
    precision: Precision = "auto"
    channels_last: bool = True
    compile: bool = False
    tta: bool = False  # average over horizontal/vertical flips
    tissue: bool | None = None  # None: on for slides, off for X-rays
    tissue_threshold: float = 0.02  # tiles with less tissue than this fraction are skipped
    tissue_mask: str | None = None  # a user-supplied mask image instead of detection
    threshold: float | None = None  # binary models; None: the model card's threshold
    prob_dtype: str = "uint8"  # stored probabilities: uint8 (p*255) | float16 | float32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_slide_pixels: int = DEFAULT_MAX_SLIDE_PIXELS
    exports: tuple[str, ...] = ("overlay",)
    workers: int | None = None  # None: one per GPU, else per CPU slot
    ray_address: str | None = None
    retries: int = 3
    faults: FaultInjection = field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        if self.tile <= 0 or self.tile % 16:
            raise ConfigError(f"tile must be a positive multiple of 16, got {self.tile=}")
        if self.halo is not None and self.halo < 0:
            raise ConfigError(f"halo must be >= 0, got {self.halo=}")
        if self.blend not in ("crop", "gaussian"):
            raise ConfigError(f"blend must be 'crop' or 'gaussian', got {self.blend=}")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap=}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto|fp32|bf16|fp16, got {self.precision=}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size=}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries=}")

    def with_(self, **changes: Any) -> RunConfig:
        """A copy with some settings changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, for provenance."""
        return asdict(self)
