"""The one typed settings object that flows from the CLI / Prefect flow to every worker.

Every field of `RunConfig` carries, in its metadata, what the rest of the system needs to
know about it, so that no list of settings is written out anywhere else:

    help      one line for `segpipe run/serve --help` (options are generated from fields)
    panel     the --help panel it is listed in
    pixels    whether it changes output pixels: provenance and the skip logic compare only
              these (`PIXEL_SETTINGS`), so a resume may change the others freely
    cli       False for settings that are not options (test-only fault injection)
    envvar    an environment variable the option also reads
    aliases   other names of the option (e.g. --export, -e for exports)
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

from pipeline.errors import ConfigError

Blend = Literal["crop", "gaussian"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Mode = Literal["accurate", "fast"]
ProbDtype = Literal["uint8", "float16", "float32"]

# 2^30 pixels: larger than any single slide level we expect (~100k x 100k is 10^10, so
# whole-slide readers check per level lazily; this guards decoded-in-memory formats).
DEFAULT_MAX_PIXELS = 1 << 30
# Tile-addressable slides are never decoded whole: their level 0 is checked against this
# generous bound (2^36, ~262k x 262k) and each decoded tile/region against max_pixels.
DEFAULT_MAX_SLIDE_PIXELS = 1 << 36

TILING, MODEL, TISSUE, OUTPUT, PACS, EXECUTION = "Tiling", "Model", "Tissue", "Output", "PACS (DICOMweb)", "Execution"


def setting(default: Any = MISSING, *, help: str, panel: str, pixels: bool = True,
            cli: bool = True, envvar: str | None = None, aliases: tuple[str, ...] = (),
            factory: Any = MISSING) -> Any:  # fmt: skip
    """A RunConfig field with its metadata (see the module docstring)."""
    meta = {"help": help, "panel": panel, "pixels": pixels, "cli": cli, "envvar": envvar,
            "aliases": aliases}  # fmt: skip
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


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

    # -- tiling and blending
    tile: int = setting(1024, panel=TILING, help="Tile side in working-level pixels, a multiple of 16.")
    halo: int | None = setting(None, panel=TILING, help="Context around each tile (default: the model card's, else 64).")
    blend: Blend = setting("crop", panel=TILING, help="crop: exact, each pixel computed once; gaussian: a global sliding window.")
    window: int = setting(512, panel=TILING, help="gaussian blend: the sliding window's side.")
    overlap: float = setting(0.25, panel=TILING, help="gaussian blend: fraction of a window shared with its neighbour, in [0, 1).")
    max_window: int = setting(2048, panel=TILING, help="crop blend: a tile + halo larger than this is split into windows.")
    # -- model
    mode: Mode | None = setting(None, panel=MODEL, help="UNet++: accurate (mean of heads) or fast (one pruned head) (default: the card's).")
    prune_level: int | None = setting(None, panel=MODEL, help="UNet++ fast mode: prune level, 1 to the model's depth.")
    precision: Precision = setting("auto", panel=MODEL, help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16.")
    tta: bool = setting(False, panel=MODEL, help="Average over horizontal and vertical flips (4x the compute).")
    allow_grey: bool = setting(False, panel=MODEL, pixels=False, help="Run grey images through a colour (RGB) model, grey repeated into R, G and B (default: refuse them).")
    allow_modality: bool = setting(False, panel=MODEL, pixels=False, help="Run DICOM images of a modality the model card does not list (default: refuse them).")
    select: tuple[str, ...] | None = setting(None, panel=MODEL, pixels=False, help="Selection rules over DICOM attributes, e.g. 'Modality in [CR, DX]', 'BodyPartExamined == CHEST', 'ViewPosition in [PA, AP] if present'; @FILE reads them from a file; all: every image. A DICOM they do not select is skipped with the reason (default: the model card's rules).")
    threshold: float | None = setting(None, panel=MODEL, help="Probability threshold of binary models, in [0, 1] (default: the card's).")
    postprocess: bool = setting(True, panel=MODEL, help="Apply the model card's post-processing of the working-level mask (keep the largest components, fill holes, ...); --no-postprocess: deliver the model's mask as it is.")
    mpp: float | None = setting(None, panel=MODEL, help="Pixel size (µm/px) of inputs that record none (PNG tiles, some TIFF crops), for choosing the level a slide model works at; a file's own pixel size wins.")
    # -- tissue
    tissue: bool | None = setting(None, panel=TISSUE, help="Skip background tiles (default: on for slides, off for X-rays).")
    tissue_threshold: float = setting(0.02, panel=TISSUE, help="Tiles with less tissue than this fraction are skipped.")
    tissue_mask: str | None = setting(None, panel=TISSUE, help="A mask image to use instead of tissue detection.")
    # -- output
    prob_dtype: ProbDtype = setting("uint8", panel=OUTPUT, help="Stored probabilities: uint8 (p*255), float16 or float32.")
    overwrite: bool = setting(False, panel=OUTPUT, pixels=False, help="Replace an output made from another input, model or pixel settings (default: refuse it and say what differs).")
    keep_paths: bool = setting(False, panel=OUTPUT, pixels=False, help="Record each input's path in its store's provenance and in the run record (never sent to Prefect); off: outputs name inputs only by their non-identifying id.")
    qc_flag_exit: bool = setting(False, panel=OUTPUT, pixels=False, help="End the run failed (exit code 1) when any image's QC verdict is flag; its outputs and exports are still written, marked.")
    exports: tuple[str, ...] = setting(("overlay",), panel=OUTPUT, pixels=False, aliases=("--export", "-e"), help="Exports written after a complete image (see `segpipe export`), or none.")
    # -- PACS (DICOMweb sources and destinations)
    store: str | None = setting(None, panel=PACS, pixels=False, help="Send each complete image's DICOM SEG with STOW-RS: dicomweb (back to the DICOMweb source it came from) or dicomweb+https://host/path; implies --export dicom-seg. A re-run sends only what was not acknowledged.")
    watermark: bool = setting(True, panel=PACS, pixels=False, help="DICOMweb sources: ask only for studies dated from the last good run's query day on (its watermark, beside the outputs); off: the source's whole date range.")
    lookback_days: int = setting(1, panel=PACS, pixels=False, help="DICOMweb sources: days before the watermark asked for again (studies that reach the PACS late).")
    # -- execution: how a run executes, never what it computes
    batch_size: int = setting(4, panel=EXECUTION, pixels=False, help="Windows per forward pass.")
    channels_last: bool = setting(True, panel=EXECUTION, pixels=False, help="channels_last memory format on GPU.")
    compile: bool = setting(False, panel=EXECUTION, pixels=False, help="torch.compile the model.")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, panel=EXECUTION, pixels=False, help="Refuse images decoded whole with more pixels than this (decompression bombs), and any working level that would plan more.")
    max_slide_pixels: int = setting(DEFAULT_MAX_SLIDE_PIXELS, panel=EXECUTION, pixels=False, help="Refuse slides whose level 0, or the pixels a run would decode from them, exceed this.")
    workers: int | None = setting(None, panel=EXECUTION, pixels=False, help="Tile workers (default: one per GPU, else one per 4 CPUs).")
    gpus_per_worker: float | None = setting(None, panel=EXECUTION, pixels=False, help="GPUs each tile worker asks Ray for; 0: CPU workers (default: 1 where the cluster has or can add GPU nodes, else 0).")
    cpus_per_worker: float | None = setting(None, panel=EXECUTION, pixels=False, help="CPUs (torch threads) each tile worker asks Ray for (default: 1 beside a GPU, else up to 4, as the largest node allows).")
    placement_timeout: float = setting(900.0, panel=EXECUTION, pixels=False, help="Seconds the tile workers may all wait for a node (an autoscaler adding one) before the run stops.")
    ray_address: str | None = setting(None, panel=EXECUTION, pixels=False, envvar="RAY_ADDRESS", help="Ray cluster to join (default: a local one).")
    retries: int = setting(3, panel=EXECUTION, pixels=False, help="Attempts per failed tile after the first.")
    faults: FaultInjection = setting(panel=EXECUTION, pixels=False, cli=False, factory=FaultInjection, help="Test-only fault injection.")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = _choices(f.type)
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)} (got {value!r})")
        positive = {"tile": self.tile, "window": self.window, "max_window": self.max_window,
                    "batch_size": self.batch_size, "max_pixels": self.max_pixels,
                    "max_slide_pixels": self.max_slide_pixels}  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1 (got {value})")
        if self.tile % 16:
            raise ConfigError(f"tile must be a positive multiple of 16 (got {self.tile})")
        if self.halo is not None and self.halo < 0:
            raise ConfigError(f"halo must be >= 0 (got {self.halo})")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"overlap must be in [0, 1) (got {self.overlap})")
        if self.prune_level is not None and self.prune_level < 1:
            raise ConfigError(f"prune_level must be >= 1 (got {self.prune_level})")
        if self.mpp is not None and not 0.0 < self.mpp <= 10_000.0:
            raise ConfigError(f"mpp must be in (0, 10000] µm/px (got {self.mpp})")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1] (got {self.threshold})")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(f"tissue_threshold must be in [0, 1] (got {self.tissue_threshold})")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (got {self.workers})")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0 (got {self.gpus_per_worker})")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0 (got {self.cpus_per_worker})")
        if self.placement_timeout <= 0:
            raise ConfigError(f"placement_timeout must be > 0 seconds (got {self.placement_timeout})")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0 (got {self.retries})")
        _check_exports(self.exports)
        if self.lookback_days < 0:
            raise ConfigError(f"lookback_days must be >= 0 (got {self.lookback_days})")
        if self.store is not None:
            _check_store(self.store)
            if "dicom-seg" not in self.exports:  # what --store sends; frozen, hence object's setattr
                object.__setattr__(self, "exports", (*self.exports, "dicom-seg"))
        if self.select is not None:
            _check_selection(self.select)

    def with_(self, **changes: Any) -> RunConfig:
        """A copy with some settings changed (validated again)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, for provenance."""
        return asdict(self)


# The settings that change output pixels; provenance identity and resume compare these.
PIXEL_SETTINGS = frozenset(f.name for f in fields(RunConfig) if f.metadata["pixels"])
PIXEL_DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.metadata["pixels"]}


def pixel_settings(run: dict[str, Any]) -> dict[str, Any]:
    """The part of a stored or requested run's settings that decides its pixels. A setting
    a stored run lacks counts as its default: the store was written before the setting
    existed, so with the behaviour its default keeps (postprocess, mpp)."""
    return {k: run.get(k, PIXEL_DEFAULTS[k]) for k in PIXEL_SETTINGS}


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The allowed values of a Literal field (annotations are strings here)."""
    literal = {"Blend": Blend, "Precision": Precision, "Mode": Mode, "ProbDtype": ProbDtype}
    name = str(annotation).removesuffix(" | None")
    return get_args(literal[name]) if name in literal else ()


def _check_store(store: str) -> None:
    # the client's own rules for an endpoint's URL
    from pipeline.io.dicomweb import Endpoint, PacsError, is_dicomweb

    if store != "dicomweb":
        if not is_dicomweb(store):
            raise ConfigError(f"store must be dicomweb or a dicomweb+https://host/path URL (got {store!r})")
        try:
            Endpoint.parse(store)
        except PacsError as exc:
            raise ConfigError(str(exc)) from None


def _check_selection(rules: tuple[str, ...]) -> None:
    from pipeline.selection import (
        parse_rules,  # the rules' own module (pydicom's dictionary)
    )

    parse_rules(rules)


def _check_exports(names: tuple[str, ...]) -> None:
    # Imported here: the export table lives with the writers, which config must not load
    # at import time (pipeline.io imports this module).
    from pipeline.io.exports import EXPORTS

    unknown = [n for n in names if n not in EXPORTS]
    if unknown:
        raise ConfigError(f"unknown export {unknown}; choose from {', '.join(EXPORTS)}")
