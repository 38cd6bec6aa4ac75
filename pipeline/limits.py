"""The planned-work limits: what running one image would cost, and its refusal when that
exceeds the run's limits.

From the image's header and the model's scale alone, before a pixel is read or a byte
written, ``planned_work`` works out the working level, the tiles, the pixels a run would
decode (the working level, and a slide's preview and picture levels) and the bytes it would
write. ``check_planned_work`` (called by ``stages.ingest``) refuses, with one InputError
line, an image whose working level or decoded pixels exceed its kind's limit (max_pixels
for images decoded whole, max_slide_pixels for slides), or whose tiles exceed MAX_TILES.

Checked from the header, first: a few hundred bytes can declare 2^36 pixels (a TIFF of empty
tiles), and a model's scale can make the working level larger than the image itself. A
refused image leaves nothing behind: no store, no ingested level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.tiling import grid_shape
from pipeline.errors import InputError
from pipeline.io import Image, picture_level
from pipeline.io.ingest import preview_level
from pipeline.store.layout import picture_from, pyramid_shapes

# Tiles one image may plan: the driver holds its status grid and tile seconds whole (5 bytes
# a tile, one chunk each) and schedules every tile. 2^22 is a 2^36-pixel working level at
# tile 128; the default tile makes 65,536 of a 262144² level.
MAX_TILES = 1 << 22


@dataclass(frozen=True)
class PlannedWork:
    """What ingesting and running one image would cost, known from its header and the
    model's scale before any pixel is read or written."""

    work_hw: tuple[int, int]
    tiles: int
    reads: tuple[tuple[str, int, tuple[int, int]], ...]  # (what for, level, (h, w)) decoded
    written_bytes: int  # the work array (when ingested), prob and the mask pyramid

    @property
    def work_pixels(self) -> int:
        return self.work_hw[0] * self.work_hw[1]

    @property
    def read_pixels(self) -> int:
        return sum(h * w for _, _, (h, w) in self.reads)


def reads_in_place(image: Image, level: int, work_hw: tuple[int, int], in_place: bool) -> bool:
    """Whether tiles read the source level in place (allowed by `in_place`, and a
    tile-addressable level at the working shape) rather than an ingested copy in the store."""
    return in_place and tuple(image.levels[level][:2]) == work_hw and image.lazy_level(level) is not None


def planned_work(image: Image, level: int, work_hw: tuple[int, int], card: ModelCard,
                 config: RunConfig, in_place: bool) -> PlannedWork:  # fmt: skip
    """The working level, tiles, pixels decoded and bytes written that running `image` at
    `work_hw` (from source `level`) would take."""
    full_h, full_w, channels = image.levels[0]
    source_hw = tuple(image.levels[level][:2])
    reads = [("the working level", level, source_hw)]
    # A slide's preview reads its level whole (level 0 when there is no pyramid); an X-ray
    # decoded whole is decoded once, and its preview reads that copy.
    levels = pyramid_shapes((full_h, full_w))
    picture = levels[picture_from(levels)]  # the store picture's first level
    if image.kind == "slide":
        at = preview_level(image)
        reads.append(("the preview", at, tuple(image.levels[at][:2])))
        at = picture_level(image, picture)
        reads.append(("the picture", at, tuple(image.levels[at][:2])))
    work_pixels = work_hw[0] * work_hw[1]
    prob_bytes = work_pixels * len(card.class_names) * np.dtype(config.prob_dtype).itemsize * 4 // 3
    written = prob_bytes + full_h * full_w * 4 // 3  # uint8 mask and its pyramid
    written += picture[0] * picture[1] * min(channels, 3) * 4 // 3  # the picture's pyramid
    if not reads_in_place(image, level, work_hw, in_place):
        itemsize = image.dtype.itemsize if source_hw == work_hw else 4  # resampled: float32
        written += work_pixels * channels * itemsize
    rows, cols = grid_shape(work_hw, config.tile)
    return PlannedWork(work_hw, rows * cols, tuple(reads), written)  # type: ignore[arg-type]


def check_planned_work(image: Image, level: int, work_hw: tuple[int, int], card: ModelCard,
                       config: RunConfig, in_place: bool) -> PlannedWork:  # fmt: skip
    """Refuse, with one InputError line, an image whose planned work exceeds the limit of its
    kind: max_pixels for X-rays decoded whole, max_slide_pixels for slides. The working
    level must fit it (a model's scale can make it larger than the image: a 512² PNG at a
    card's 200000² is 4e10 pixels), and so must a slide's decoded pixels (a 512 KB TIFF of
    empty tiles declaring 262144² and no pyramid: its tiles and its preview read 2^37)."""
    plan = planned_work(image, level, work_hw, card, config, in_place)
    setting = "max_pixels" if image.kind == "xray" else "max_slide_pixels"
    limit = getattr(config, setting)
    limit_text = f"{setting}={limit}; raise --{setting.replace('_', '-')} to run it"
    if plan.work_pixels > limit:
        (h, w), tile = plan.work_hw, config.tile
        raise InputError(
            f"{image.path}: planned working level {h}x{w} = {plan.work_pixels} pixels "
            f"({plan.tiles} tiles of {tile}x{tile}, {plan.written_bytes / 1e9:.1f} GB of work "
            f"array and outputs) exceeds {limit_text}"
        )
    if plan.read_pixels > limit:
        parts = ", ".join(f"level {lv} {h}x{w} for {what}" for what, lv, (h, w) in plan.reads)
        raise InputError(f"{image.path}: planned reads of {plan.read_pixels} pixels ({parts}) exceed {limit_text}")
    if plan.tiles > MAX_TILES:
        (h, w), tile = plan.work_hw, config.tile
        raise InputError(f"{image.path}: planned {plan.tiles} tiles of {tile}x{tile} over the working level "
                         f"{h}x{w} exceed {MAX_TILES} per image; raise --tile to run it")  # fmt: skip
    return plan
