"""Training data: image/mask pairs read through the inference readers, at the model's scale.

Two kinds of source, chosen by the model's scale (pipeline.cards.ModelCard.scale):
  - {"size": [h, w]} (whole X-rays): each image is read whole, resized to the size and kept
    in memory, as inference's working level would be. Its labels are also kept at full
    resolution, because inference delivers masks there and validation scores them there.
  - {"mpp": m} or None (slides): nothing is loaded whole. Patches are cut at random from the
    level inference would use, through `resize_region`, reading only the pixels a patch
    needs, so a 50k² slide never sits in memory. Sampling can favour foreground.
Normalisation statistics come from the whole image's preview, exactly as in inference
(pipeline.stages), never from a patch: per-patch windows would teach the model contrasts it
never sees at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.normalization import image_stats, normalize
from pipeline.errors import ConfigError, InputError
from pipeline.io import Image, open_image, preview, resize, to_channels
from pipeline.io.levels import working_level
from pipeline.io.resample import resize_region
from pipeline.io.sniff import sniff

MASK_SEPARATORS = ("_", "-", ".")


@dataclass(frozen=True)
class Pair:
    """An image and its label mask (any reader's format; masks 0/255, 0/1 or labels)."""

    image: Path
    mask: Path


@dataclass(frozen=True)
class Sample:
    """One model input at working scale and its labels (h, w) int64, scored on `truth`
    (the labels at the resolution results are delivered at: full resolution for whole
    X-rays, the working scale for slide patches)."""

    source: str
    image: np.ndarray
    labels: np.ndarray
    truth: np.ndarray


@dataclass(frozen=True)
class DataSpec:
    """How sources are turned into samples: the model card's view of the data."""

    normalization: dict[str, Any]
    scale: dict[str, Any] | None
    in_channels: int
    classes: int
    patch: int
    image_mpp: float | None = None  # level-0 µm/px for files that do not record it
    foreground_bias: float = 0.0  # fraction of slide patches centred on a foreground pixel

    @property
    def whole(self) -> bool:
        """Whole images resized to a size (X-rays), rather than patches of a level."""
        return self.scale is not None and "size" in self.scale

    @property
    def sample_hw(self) -> tuple[int, int]:
        """The (h, w) of one training sample."""
        if self.whole and self.patch >= max(self.scale["size"]):
            return tuple(self.scale["size"])
        return self.patch, self.patch


def find_pairs(images: str | Path, masks: str | Path) -> list[Pair]:
    """Pair images with masks by name. Both may be single files or folders; in folders a
    mask belongs to the image whose name equals its own or prefixes it before a separator
    ("CHNCXR_0001_0.png" ↔ "CHNCXR_0001_0_mask.png"), the longest such name winning."""
    images, masks = Path(images), Path(masks)
    if not images.is_dir() and not masks.is_dir():
        return [Pair(images, masks)]
    if not (images.is_dir() and masks.is_dir()):
        raise ConfigError(f"{images}, {masks}: give two folders or two files, not one of each")
    by_stem = {_stem(p): p for p in _image_files(images)}
    found: dict[str, Path] = {}
    for mask in _image_files(masks):
        owner = _owner(_stem(mask), by_stem)
        if owner is None:
            continue
        if owner in found:
            raise InputError(f"{mask}: second mask for image {by_stem[owner]} (first: {found[owner]})")
        found[owner] = mask
    missing = sorted(set(by_stem) - set(found))
    if missing:
        raise InputError(f"{masks}: no mask for images {missing[:5]} (of {len(missing)})")
    if not found:
        raise InputError(f"{images}: no images found")
    return [Pair(by_stem[s], found[s]) for s in sorted(found)]


def select_pairs(pairs: list[Pair], names: tuple[str, ...] | list[str]) -> list[Pair]:
    """The pairs whose image name (stem) is in `names`, in their order; all when `names`
    is empty. A name without a pair is an error: a split must not shrink silently."""
    if not names:
        return pairs
    chosen = [p for p in pairs if _stem(p.image) in set(names)]
    missing = sorted(set(names) - {_stem(p.image) for p in chosen})
    if missing:
        raise InputError(f"{pairs[0].image.parent if pairs else '?'}: no image/mask pair for "
                         f"split names {missing[:5]} (of {len(missing)})")
    return chosen


def _image_files(folder: Path) -> list[Path]:
    """Files (and zarr folders) the readers recognise; README files and the like are skipped."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            sniff(path)
        except InputError:
            continue
        out.append(path)
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _owner(mask_stem: str, image_stems: dict[str, Path]) -> str | None:
    candidates = [s for s in image_stems
                  if mask_stem == s or (mask_stem.startswith(s) and mask_stem[len(s)] in MASK_SEPARATORS)]
    return max(candidates, key=len, default=None)


def mask_labels(raw: np.ndarray, classes: int, source: str | Path) -> np.ndarray:
    """Raw mask pixels (h, w[, C]) -> labels (h, w) int64. Binary models: 0/255 masks
    (anti-aliased edges allowed) are cut at 127, 0/1 masks at 0. Multi-class: the values
    are the labels 0..classes-1."""
    values = raw[..., 0] if raw.ndim == 3 else raw
    if classes == 1:
        cut = 127 if values.max(initial=0) > 1 else 0
        return (values > cut).astype(np.int64)
    labels = values.astype(np.int64)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
        raise InputError(f"{source}: mask values {labels.min()}..{labels.max()} are not labels "
                         f"0..{classes - 1}")
    return labels


class WholeSource:
    """A whole image resized to the model's size, in memory (X-rays)."""

    def __init__(self, pair: Pair, spec: DataSpec):
        size = tuple(spec.scale["size"])
        with open_image(pair.image) as image, open_image(pair.mask) as mask:
            raw = image.read_region(0, 0, 0, *image.levels[0][:2])
            stats = image_stats(preview(image), spec.normalization, spec.in_channels)
            truth = mask_labels(mask.read_region(0, 0, 0, *mask.levels[0][:2]), spec.classes, pair.mask)
        if truth.shape != raw.shape[:2]:
            raise InputError(f"{pair.mask}: mask {truth.shape} does not match image {raw.shape[:2]}")
        pixels = to_channels(resize(raw, size), spec.in_channels)
        self.name = pair.image.name
        self.image = normalize(pixels, spec.normalization, stats)
        self.truth = truth
        self.labels = resize_labels(truth, size, spec.classes)
        self.patch = spec.patch

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The whole image, or a random patch of it when the patch is smaller."""
        h, w = self.labels.shape
        if self.patch >= max(h, w):
            return self.image, self.labels
        y, x = int(rng.integers(h - self.patch + 1)), int(rng.integers(w - self.patch + 1))
        window = np.s_[y : y + self.patch, x : x + self.patch]
        return self.image[window], self.labels[window]

    def validation(self) -> list[Sample]:
        return [Sample(self.name, self.image, self.labels, self.truth)]


class TileSource:
    """Random patches of a large image at the model's µm/px, read on demand (slides)."""

    def __init__(self, pair: Pair, spec: DataSpec):
        self.pair, self.spec, self.name = pair, spec, pair.image.name
        self.image = open_image(pair.image)
        self.mask = open_image(pair.mask)
        self.level, self.work_hw = _working_level(self.image, spec)
        self.stats = image_stats(preview(self.image), spec.normalization, spec.in_channels)
        if min(self.work_hw) < spec.patch:
            raise ConfigError(f"{pair.image}: working level {self.work_hw} is smaller than "
                              f"the patch {spec.patch}")
        # where foreground is, coarsely: any labelled pixel inside a preview cell counts
        overview = preview(self.mask)[..., 0] > 0
        self.foreground = np.argwhere(overview)
        self.overview_hw = overview.shape

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random patch; with probability foreground_bias one centred on foreground."""
        p = self.spec.patch
        h, w = self.work_hw
        if len(self.foreground) and rng.random() < self.spec.foreground_bias:
            cy, cx = self.foreground[rng.integers(len(self.foreground))] + rng.random(2)
            y = int(cy * h / self.overview_hw[0]) - p // 2
            x = int(cx * w / self.overview_hw[1]) - p // 2
            y, x = min(max(y, 0), h - p), min(max(x, 0), w - p)
        else:
            y, x = int(rng.integers(h - p + 1)), int(rng.integers(w - p + 1))
        return self.read(y, x, p, p)

    def read(self, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Normalised pixels and labels of the working-level window (y, x, h, w)."""
        level_hw = self.image.levels[self.level][:2]
        rows, cols = (y, y + h), (x, x + w)
        raw = resize_region(lambda *r: self.image.read_region(self.level, *r), level_hw,
                            self.work_hw, rows, cols)
        pixels = normalize(to_channels(raw, self.spec.in_channels), self.spec.normalization, self.stats)
        return pixels, self._labels(rows, cols)

    def _labels(self, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        mask_hw = self.mask.levels[0][:2]

        def read(y: int, x: int, h: int, w: int) -> np.ndarray:
            return mask_labels(self.mask.read_region(0, y, x, h, w), self.spec.classes, self.pair.mask)

        if self.spec.classes == 1:
            # binary labels resample like the image, then cut at half: smooth edges whatever
            # the mask's own resolution
            soft = resize_region(lambda *r: read(*r)[..., None].astype(np.float32), mask_hw,
                                 self.work_hw, rows, cols)
            return (soft[..., 0] > 0.5).astype(np.int64)
        return nearest_region(read, mask_hw, self.work_hw, rows, cols)

    def validation(self, tiles: int, rng: np.random.Generator) -> list[Sample]:
        """Up to `tiles` patches on a grid over the working level (a seeded choice)."""
        p = self.spec.patch
        grid = [(y, x) for y in range(0, self.work_hw[0] - p + 1, p)
                for x in range(0, self.work_hw[1] - p + 1, p)]
        chosen = sorted(rng.choice(len(grid), size=min(tiles, len(grid)), replace=False))
        samples = []
        for i in chosen:
            image, labels = self.read(*grid[i], p, p)
            samples.append(Sample(self.name, image, labels, labels))
        return samples


def _working_level(image: Image, spec: DataSpec) -> tuple[int, tuple[int, int]]:
    """The level inference reads for this image and the working (h, w) at the model's
    µm/px: pipeline.io.levels.working_level, the rule pipeline.stages.working_geometry uses."""
    target = (spec.scale or {}).get("mpp")
    if target is None:
        return 0, tuple(image.levels[0][:2])
    if image.mpp is None:
        if spec.image_mpp is None:
            raise ConfigError(f"{image.path}: the file records no µm/px; set image_mpp")
        # the reader is ours alone: record the pixel size the file lacks
        image.mpp = spec.image_mpp
    chosen = working_level(image, float(target))
    return chosen.level, chosen.hw


def resize_labels(labels: np.ndarray, size: tuple[int, int], classes: int) -> np.ndarray:
    """Labels at another size: binary by bilinear resampling cut at half, multi-class nearest."""
    if classes == 1:
        return (resize(labels[..., None].astype(np.float32), size)[..., 0] > 0.5).astype(np.int64)
    return nearest_region(lambda y, x, h, w: labels[y : y + h, x : x + w], labels.shape, size,
                          (0, size[0]), (0, size[1]))


def nearest_region(read: Callable[[int, int, int, int], np.ndarray], src_hw: tuple[int, int],
                   out_hw: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Rows and columns of a nearest-neighbour resize of (h, w) labels, reading only the
    source rectangle they come from."""
    ys = _nearest_index(src_hw[0], out_hw[0], *rows)
    xs = _nearest_index(src_hw[1], out_hw[1], *cols)
    src = read(int(ys[0]), int(xs[0]), int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1))
    return src[np.ix_(ys - ys[0], xs - xs[0])]


def _nearest_index(src: int, out: int, start: int, stop: int) -> np.ndarray:
    centres = (np.arange(start, stop) + 0.5) * src / out
    return np.minimum(np.floor(centres).astype(np.int64), src - 1)


def build_sources(pairs: list[Pair], spec: DataSpec) -> list[WholeSource | TileSource]:
    """One source per pair, whole or tiled by the model's scale."""
    return [WholeSource(p, spec) if spec.whole else TileSource(p, spec) for p in pairs]


def validation_samples(sources: list[WholeSource | TileSource], tiles: int, seed: int) -> list[Sample]:
    """The validation set: whole images, or `tiles` fixed patches of each large image."""
    rng = np.random.default_rng([seed, 0xFA11])
    out: list[Sample] = []
    for source in sources:
        out += source.validation() if isinstance(source, WholeSource) else source.validation(tiles, rng)
    return out


def sample_batch(sources: list[WholeSource | TileSource], size: int, seeds: list[int],
                 transform: Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`size` augmented samples as (N, C, h, w) float32 and (N, h, w) int64. Sample i is
    a pure function of its seed sequence `[*seeds, i]`: the same step reproduces exactly."""
    images, labels = [], []
    for i in range(size):
        rng = np.random.default_rng([*seeds, i])
        source = sources[int(rng.integers(len(sources)))]
        image, label = transform(*source.sample(rng), rng)
        images.append(np.moveaxis(image, -1, 0))
        labels.append(label)
    return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64)


def patch_fits(shape: tuple[int, int], multiple: int) -> None:
    """Patches must be whole multiples of the model's downsampling, else the padding the
    model adds would be learnt as content."""
    if any(s % multiple for s in shape):
        raise ConfigError(f"training size {shape} is not a multiple of {multiple} (2^depth)")

