"""The working level of an image for a model trained at some µm/px: one rule, torch-free,
used by inference (pipeline.stages.working_geometry) and training (pipeline.train.data), so a
model is trained on the pixels it will later be run on.

    working_level(image, model_mpp) -> WorkingLevel(level, factor, resample, hw)
    assume_mpp(image, mpp)          a run's --mpp for a file that records no pixel size

A level whose µm/px is within SCALE_TOLERANCE of the model's is used as it is; otherwise
the coarsest level finer than the model's (pipeline.io.image.select_level) is resampled to
the model's µm/px (level 0 upsampled when even it is coarser).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.tiling import work_shape_for
from pipeline.io.image import Image, level_mpp, select_level

# 2 %: within it a level is used as it is. Resampling a whole level for a difference smaller
# than scanners' own pixel-size calibration error costs a full read and a blur and buys
# nothing; it also absorbs pyramid levels whose sizes were rounded (a 2x level is rarely
# exactly 2x). The same number for training and inference: a slide at 0.499 µm/px under a
# 0.5 model is read unresampled by both.
SCALE_TOLERANCE = 0.02


@dataclass(frozen=True)
class WorkingLevel:
    """The level a model reads, the factor still needed (model µm/px / level µm/px: > 1
    downsample, < 1 upsample), whether it is resampled, and the working (h, w)."""

    level: int
    factor: float
    resample: bool
    hw: tuple[int, int]


def working_level(image: Image, model_mpp: float) -> WorkingLevel:
    """The working level of `image` (its `mpp` must be known) for a model at `model_mpp`."""
    level, factor = select_level(image, model_mpp)  # refuses a missing mpp or a bad target
    coarser = level + 1
    if coarser < len(image.levels) and _close(model_mpp / level_mpp(image, coarser)):
        # the next level is a hair coarser than the model (a slide at 0.2525 µm/px has its
        # 4x level at 1.01 under a 1.0 model): use it rather than resample a 4x larger one
        level, factor = coarser, model_mpp / level_mpp(image, coarser)
    level_hw = tuple(image.levels[level][:2])
    if _close(factor):
        return WorkingLevel(level, factor, False, level_hw)
    return WorkingLevel(level, factor, True, work_shape_for(level_hw, factor))


def _close(factor: float) -> bool:
    return abs(factor - 1) <= SCALE_TOLERANCE


def assume_mpp(image: Image, mpp: float | None) -> str | None:
    """Give a file that records no pixel size the run's `mpp` (--mpp; the reader is the
    caller's alone); a file's own pixel size wins. Returns where the image's µm/px came
    from, for provenance: "file", "--mpp" or None (unknown)."""
    if image.mpp is not None:
        return "file"
    if mpp is None:
        return None
    image.mpp = mpp
    return "--mpp"
