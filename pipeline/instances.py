"""Instances (touching nuclei separated) from a 3-class output, and their ids across tiles.

A model card declares instances (card ``instances``, e.g. {"name": "nuclei", "seed_class": 1,
"grow_px": 2, "min_px": 4}): its output has a seed class (the nucleus interior) and
further foreground classes (the boundary ring around it). On a working-level window:

    instance_keys  seeds = 4-connected components of the arg-max seed class (those under
                   min_px dropped), each named by its anchor, its first pixel in raster
                   order, as key = y * width + x + 1 in working-level image coordinates
                   (anchor_keys); then grown by up to grow_px into the other foreground
                   pixels (nearest seed: skimage's expand_labels), so touching nuclei stay
                   apart. With ``"split": "watershed"`` a seed component is first cut
                   between its markers (watershed_split): merged nuclei come apart

Tile-owned and deterministic (docs/design.md, "Instances"): each tile derives instances on
its region grown by a margin, and writes the keys of its own region only. An instance that
touches the tile and is narrower than the margin lies whole inside the window, so every
tile that sees it finds the same pixels and the same anchor, whatever the tile order; it
gets one key across tile borders and the image border alike. Finalize maps the sorted keys
to ids 1..n (``compact_ids``): ids follow the anchors' raster order, unique per image.
Stated limit: an instance wider than the margin may be cut at a tile border (two ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from scipy import ndimage
from skimage import segmentation

KEY_DTYPE = np.uint32  # keys and ids: a working level of up to 2^32 - 1 pixels (65,535²)
MAX_KEY = int(np.iinfo(KEY_DTYPE).max)
DEFAULTS = {"seed_class": 1, "grow_px": 2, "min_px": 4}
# the watershed split's settings (watershed_split) and their bounds
SPLIT_DEFAULTS = {"marker_prob": 0.5, "marker_dist": 0.0, "marker_px": 1, "flood": "distance"}
FLOODS = ("distance", "prob")


def card_problems(spec: Any, classes: int) -> list[str]:
    """What is wrong with a card's ``instances`` ({}: none), one phrase each."""
    if spec == {}:
        return []
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"].isidentifier():
        return [f"instances={spec!r:.80} needs a name (an identifier, e.g. 'nuclei')"]
    problems = []
    seed = spec.get("seed_class", DEFAULTS["seed_class"])
    if classes < 2 or not isinstance(seed, int) or not 1 <= seed < classes:
        problems.append(f"instances.seed_class={seed!r:.20} must be a foreground class of a "
                        f"multi-class output (1..{classes - 1})")
    for key in ("grow_px", "min_px"):
        value = spec.get(key, DEFAULTS[key])
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 64:
            problems.append(f"instances.{key}={value!r:.20} not in 0..64")
    return problems + _split_problems(spec)


def _split_problems(spec: Mapping[str, Any]) -> list[str]:
    split = spec.get("split", "none")
    if split not in ("none", "watershed"):
        return [f"instances.split={split!r:.20} must be 'none' or 'watershed'"]
    problems = []
    for key, high in (("marker_prob", 1.0), ("marker_dist", 16.0)):
        value = spec.get(key, SPLIT_DEFAULTS[key])
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= high:
            problems.append(f"instances.{key}={value!r:.20} not in 0..{high:g}")
    px = spec.get("marker_px", SPLIT_DEFAULTS["marker_px"])
    if not isinstance(px, int) or isinstance(px, bool) or not 0 <= px <= 64:
        problems.append(f"instances.marker_px={px!r:.20} not in 0..64")
    if spec.get("flood", SPLIT_DEFAULTS["flood"]) not in FLOODS:
        problems.append(f"instances.flood={spec.get('flood')!r:.20} must be one of {list(FLOODS)}")
    return problems


def settings(spec: Mapping[str, Any]) -> tuple[int, int, int]:
    """(seed_class, grow_px, min_px) of a card's instances, defaults filled in."""
    return tuple(int(spec.get(k, DEFAULTS[k])) for k in ("seed_class", "grow_px", "min_px"))  # type: ignore[return-value]


def instance_keys(probs: np.ndarray, spec: Mapping[str, Any], origin: tuple[int, int],
                  image_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) uint32 instance keys (0: none) of a window's (h, w, K) probabilities (channel
    0 background) at `origin` of a working level `image_hw`: seed components of the seed
    class named by their anchors, then grown into the other foreground. The anchor is the
    seed's, not the grown instance's: growing breaks distance ties by scan order, the seed
    is the same pixels in every window that holds it."""
    seed_class, grow_px, min_px = settings(spec)
    labels = probs.argmax(axis=-1)
    seeds, n = ndimage.label(labels == seed_class)  # 4-connected: a diagonal touch stays two
    if n and min_px > 1:
        sizes = np.bincount(seeds.ravel(), minlength=n + 1)
        seeds[sizes[seeds] < min_px] = 0
    if spec.get("split", "none") == "watershed":
        seeds = watershed_split(seeds, probs[..., seed_class], {**SPLIT_DEFAULTS, **spec})
    keys = anchor_keys(seeds, origin, image_hw)
    grown = segmentation.expand_labels(keys, distance=grow_px) if grow_px else keys
    return np.where(labels > 0, grown, 0).astype(KEY_DTYPE)


def watershed_split(seeds: np.ndarray, seed_prob: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Seed components cut between their markers: marker pixels are seed pixels whose seed
    probability is at least marker_prob and whose distance to the nearest non-seed pixel
    is at least marker_dist; their 4-connected components of marker_px pixels or more are
    markers. Each seed component is flooded from its markers (skimage's watershed on minus
    that distance, or minus the seed probability: flood "prob"), 4-connected, inside the
    seeds; a component without a marker stays whole.

    Every step is a function of the seed component's own pixels and probabilities: the
    distance of a pixel to the nearest non-seed pixel is reached within the component's
    4-neighbours (any nearer non-component pixel would be 4-adjacent to it, so in it), and
    the flood never leaves the component, with ties broken by the order of its own pixels
    (the markers' order fixed below).
    So a component whole in two windows is cut the same way in both (the tile-owned ids'
    condition, docs/design.md "Instances")."""
    region = seeds > 0
    if not region.any():
        return seeds
    dist = ndimage.distance_transform_edt(region)
    markers, m = ndimage.label(region & (seed_prob >= spec["marker_prob"]) & (dist >= spec["marker_dist"]))
    if m and spec["marker_px"] > 1:
        sizes = np.bincount(markers.ravel(), minlength=m + 1)
        markers[sizes[markers] < spec["marker_px"]] = 0
    marked = np.zeros(int(seeds.max()) + 1, bool)
    marked[seeds[markers > 0]] = True
    lonely = region & ~marked[seeds]  # components without a marker: their own marker, whole
    markers = np.where(lonely, seeds.astype(np.int64) + m, markers)
    elevation = -dist if spec["flood"] == "distance" else -seed_prob.astype(np.float64)
    # skimage's flood pops equal values in the order they were pushed, except its markers
    # (all pushed at age 0), which tie in an order that depends on the whole heap, i.e. on
    # the other components in the window. So the marker pixels are given distinct values
    # below all others, increasing in raster order: they flood first, in raster order, the
    # same order within a component in every window.
    placed = np.flatnonzero(markers)
    elevation.flat[placed] = elevation.min() - 2 + np.arange(len(placed)) / (len(placed) + 1)
    return segmentation.watershed(elevation, markers, mask=region, connectivity=1)


def derive(probs: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """(h, w) uint32 instance ids 1..n of a whole image's probabilities (benchmarks)."""
    keys = instance_keys(probs, spec, (0, 0), probs.shape[:2])
    return compact_ids(keys, unique_keys([keys]))


def anchor_keys(labels: np.ndarray, origin: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) uint32 keys of a window's instance labels: each instance's first pixel in
    raster order (the same inside a window as in the image: the window is a rectangle),
    as y * width + x + 1 in image coordinates; 0 where there is none."""
    check_key_space(image_hw)
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    y, x = np.divmod(first, labels.shape[1])
    keys = (origin[0] + y).astype(np.int64) * image_hw[1] + (origin[1] + x) + 1
    table = np.zeros(int(ids.max(initial=0)) + 1, np.int64)
    table[ids] = np.where(ids > 0, keys, 0)
    return table[labels].astype(KEY_DTYPE)


def check_key_space(image_hw: tuple[int, int]) -> None:
    """Keys are uint32: refuse a working level with more pixels than they can name."""
    if int(image_hw[0]) * int(image_hw[1]) > MAX_KEY - 1:
        raise ValueError(f"instance ids: working level {image_hw} has more than {MAX_KEY - 1} "
                         "pixels, more than uint32 keys can name")


def unique_keys(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The sorted nonzero keys found in `chunks` (one pass; memory: the instance count)."""
    found = np.zeros(0, KEY_DTYPE)
    for chunk in chunks:
        found = np.union1d(found, np.unique(chunk))
    return found[found > 0].astype(KEY_DTYPE)


def compact_ids(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Keys -> ids 1..n by rank among `sorted_keys` (0 stays 0): ids in anchor raster order,
    unique per image, the same whatever order tiles ran in."""
    ids = np.searchsorted(sorted_keys, keys) + 1
    return np.where(keys > 0, ids, 0).astype(KEY_DTYPE)


def nearest_index(start: int, stop: int, work: int, full: int) -> np.ndarray:
    """Working-level index of full-resolution pixels start..stop-1 (nearest, pixel centres:
    the mapping the mask is delivered with)."""
    centres = (np.arange(start, stop) + 0.5) * work / full
    return np.minimum(np.floor(centres).astype(np.int64), work - 1)
