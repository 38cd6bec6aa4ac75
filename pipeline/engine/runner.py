"""One tile, start to finish: read tile + halo, normalise, run windows, blend, deliver at
full resolution, write the tile's own chunks, report. Ray actors and the single-process
path both call `TileRunner.run`.

    read      the windows' bounding box from the working-level array  (I/O, no lock)
    infer     normalise, batch windows through the model, blend       (under the compute lock)
    deliver   crop to the tile; upsample to full resolution and label, piece by piece
    write     the tile's own prob chunk, and each mask piece as it is made (I/O, no lock)

Reading and writing happen outside the compute lock, so a second thread reading the next
tile overlaps the model running on the current one.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import instances, postprocess
from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.normalization import normalize
from pipeline.engine.predictor import Predictor
from pipeline.engine.stitching import CropCanvas, GaussianCanvas, deliver_full_res
from pipeline.engine.tiling import (
    Box,
    Tile,
    Window,
    bounding_box,
    crop_windows,
    gaussian_windows,
    windows_touching,
    work_box_for_full,
)
from pipeline.io import to_channels
from pipeline.job import ImageJob, TileReport, TileStatus
from pipeline.models import checkpoint
from pipeline.store import OutputStore


@dataclass(frozen=True)
class TileInput:
    """A tile's pixels as read: the windows and the raw box that holds them all."""

    tile: Tile
    full_box: Box  # the full-resolution mask chunks the tile owns (may be empty)
    region: Box  # working-level box whose probabilities the tile needs (>= tile.region)
    windows: list[Window]
    box: Box
    pixels: np.ndarray
    norm_stats: dict[str, float]


@dataclass(frozen=True)
class BlendStrategy:
    """A blend mode (RunConfig.blend): the windows a tile runs, and the canvas that
    merges their outputs. Chosen once per runner."""

    windows: Callable[[ImageJob, Tile, RunConfig, int], list[Window]]
    canvas: Callable[[Box, int], Any]


def _crop_windows(job: ImageJob, tile: Tile, config: RunConfig, multiple: int) -> list[Window]:
    """crop: the tile grown by the halo, split where larger than max_window."""
    size = max(tile.region.h, tile.region.w, tile.size)
    return crop_windows(Tile(tile.index, tile.region, size), job.work_hw, job.halo, multiple, config.max_window)


def _gaussian_windows(job: ImageJob, tile: Tile, config: RunConfig, multiple: int) -> list[Window]:
    """gaussian: every window of the image's global sliding-window grid touching the tile."""
    grid = gaussian_windows(job.work_hw, config.window, config.overlap)
    return [Window(input=b, keep=b) for b in windows_touching(tile, grid)]


BLENDS = {"crop": BlendStrategy(_crop_windows, CropCanvas), "gaussian": BlendStrategy(_gaussian_windows, GaussianCanvas)}


class TileRunner:
    """Runs tiles with one model, loaded once. Thread-safe: the model runs under a lock."""

    def __init__(self, model_path: str, config: RunConfig):
        model, card = checkpoint.load(model_path, **_mode_overrides(config))
        self.card: ModelCard = card
        self.config = config
        self.multiple = model.multiple
        self.predictor = Predictor(model, config)
        self.threshold = config.threshold if config.threshold is not None else card.threshold
        self.blend = BLENDS[config.blend]
        # the card's post-processing (a fixed-size model's: cards refuse it otherwise)
        self.postprocess = dict(card.postprocess) if config.postprocess else {}
        self.instances = dict(card.instances)  # the card's instance output ({}: none)
        self._compute = threading.Lock()
        self._open: dict[str, tuple[Any, OutputStore]] = {}
        self._open_lock = threading.Lock()
        self.tiles_run = 0

    def run(self, job: ImageJob, tile: Tile, attempt: int = 1) -> TileReport:
        """Compute and write one tile; raises on failure (the scheduler records it)."""
        start = time.perf_counter()
        self._inject_faults(tile, attempt)
        work, store = self._resources(job)
        data = self.read(job, tile, work, store)
        with self._compute:
            probs = self.infer(data)
        self.write(job, data, probs, store)
        self.tiles_run += 1
        return TileReport(tile.index, TileStatus.DONE, seconds=time.perf_counter() - start,
                          windows=len(data.windows))

    def read(self, job: ImageJob, tile: Tile, work: Any, store: OutputStore) -> TileInput:
        """Plan the tile's windows and read the raw pixels they cover, once."""
        _, full_box = store.owned_boxes(tile)
        region = _needed_region(job, tile, full_box, whole=bool(self.postprocess))
        if self.instances:  # instances narrower than the halo lie whole in the window
            region = _grown(region, job.halo, job.work_hw)
        windows = self.blend.windows(job, Tile(tile.index, region, tile.size), self.config, self.multiple)
        box = bounding_box(w.input for w in windows)
        pixels = np.asarray(work[box.y0 : box.y1, box.x0 : box.x1, :])
        return TileInput(tile, full_box, region, windows, box, pixels, job.norm_stats)

    def infer(self, data: TileInput) -> np.ndarray:
        """Probabilities (h, w, K) over `data.region`: model outputs blended per the config."""
        card = self.card
        pixels = to_channels(data.pixels, card.in_channels)
        pixels = normalize(pixels, card.normalization, data.norm_stats)
        canvas = self.blend.canvas(data.region, self.predictor.classes)
        for shape, group in _by_shape(data.windows).items():
            batch = np.stack([pixels[w.input.relative_to(data.box).slices()] for w in group])
            for window, probs in zip(group, self.predictor(batch), strict=True):
                canvas.add(window.input, window.keep, probs)
        return canvas.result()

    def write(self, job: ImageJob, data: TileInput, probs: np.ndarray, store: OutputStore) -> None:
        """Crop to the tile and write its prob chunk; then deliver the mask at full resolution
        one piece of whole chunks at a time (upsample, label, write): the full-res box a tile
        owns grows with the model's scale (a 256² model on a 16384² X-ray: 16384²), a piece
        does not (invariant 3). The stored prob is the model's; the mask is delivered from
        the card's post-processing of the whole working level (`data.region` is all of it
        then: _needed_region)."""
        tile = data.tile
        own = probs[tile.region.relative_to(data.region).slices()]
        # Multi-class outputs carry background as channel 0; the store keeps the classes.
        stored = own if own.shape[-1] == 1 else own[..., 1:]
        store.write_tile(tile, stored, None, data.full_box)
        if self.instances:
            keys = instances.instance_keys(probs, self.instances, (data.region.y0, data.region.x0), job.work_hw)
            store.write_instance_keys(tile, keys[tile.region.relative_to(data.region).slices()])
        if self.postprocess and not data.full_box.is_empty:
            probs = postprocess.apply(probs, self.threshold, self.postprocess)
        pieces = deliver_full_res(probs, data.region, data.full_box, job.work_hw, job.full_hw,
                                  store.layout.full_chunk, self.threshold)  # fmt: skip
        for piece, labels in pieces:
            store.write_mask_piece(tile, piece, labels)

    def forget_stores(self) -> None:
        """Drop the open stores: a runner kept across runs (`shared_runner`) must not write
        through the handle of a store that was replaced since (--overwrite)."""
        with self._open_lock:
            self._open.clear()

    def _resources(self, job: ImageJob) -> tuple[Any, OutputStore]:
        with self._open_lock:
            if job.image_id not in self._open:
                if len(self._open) >= 4:  # a worker serves a few images at a time
                    self._open.pop(next(iter(self._open)))
                store = OutputStore.open(job.store_path, mode="r+")
                self._open[job.image_id] = (job.open_work(), store)
            return self._open[job.image_id]

    def _inject_faults(self, tile: Tile, attempt: int) -> None:
        faults = self.config.faults
        if tile.index in faults.fail_tiles and (faults.fail_attempts == 0 or attempt <= faults.fail_attempts):
            raise RuntimeError(f"injected fault in tile {tile.index}, attempt {attempt}")
        if faults.exit_after is not None and self.tiles_run >= faults.exit_after and _first_life():
            os._exit(1)


def _first_life() -> bool:
    """False in a Ray actor that was restarted: an injected crash happens only once."""
    try:
        import ray

        return not ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:  # not inside a Ray actor
        return True


def _mode_overrides(config: RunConfig) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if config.mode is not None:
        overrides["mode"] = config.mode
    if config.prune_level is not None:
        overrides["prune_level"] = config.prune_level
    return overrides


def _by_shape(windows: list[Window]) -> dict[tuple[int, int], list[Window]]:
    groups: dict[tuple[int, int], list[Window]] = {}
    for w in windows:
        groups.setdefault(w.input.shape, []).append(w)
    return groups


def _needed_region(job: ImageJob, tile: Tile, full_box: Box, whole: bool = False) -> Box:
    """The tile's region, grown to what bilinear delivery of its full-res chunks reads; the
    whole working level when the mask is post-processed (`whole`: component steps need
    every pixel; a fixed-size model's level is small, and usually one tile anyway)."""
    if whole and not full_box.is_empty:
        return Box(0, 0, *job.work_hw)
    if job.work_hw == job.full_hw or full_box.is_empty:
        return tile.region
    extra = work_box_for_full(full_box, job.work_hw, job.full_hw)
    return bounding_box([tile.region, extra])


def _grown(box: Box, by: int, hw: tuple[int, int]) -> Box:
    """`box` grown by `by` on every side, inside the image (h, w)."""
    return Box(max(0, box.y0 - by), max(0, box.x0 - by), min(hw[0], box.y1 + by), min(hw[1], box.x1 + by))


# -- one loaded model per checkpoint and settings, for the calls of a process --------------

SHARED_RUNNERS = 2  # models kept loaded at once (the shipped ones are a few MB each)
_shared: OrderedDict[tuple[Any, ...], TileRunner] = OrderedDict()
_shared_lock = threading.Lock()


def shared_runner(model_path: str, config: RunConfig) -> TileRunner:
    """A TileRunner for this checkpoint and these settings, kept for the later calls of
    this process (`pipeline.segment` image after image): loading a checkpoint and folding
    its BatchNorm took half of a small image's time. Keyed by the file's real path, size
    and modification time as well, so a rewritten checkpoint is loaded again."""
    stat = os.stat(model_path)
    key = (os.path.realpath(model_path), stat.st_size, stat.st_mtime_ns, config)
    with _shared_lock:  # one load at a time: two threads asking for a model load it once
        runner = _shared.pop(key, None) or TileRunner(model_path, config)
        _shared[key] = runner
        while len(_shared) > SHARED_RUNNERS:
            _shared.popitem(last=False)
    runner.forget_stores()
    return runner
