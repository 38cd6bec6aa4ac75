"""Post-processing a model card declares (`ModelCard.postprocess`), applied to the whole
working-level mask before delivery at full resolution. Pure functions over numpy arrays.

    check_spec       what is wrong with a card's spec, one phrase each ([]: fine)
    clean_mask       the steps on a binary mask: drop specks, keep the largest, fill holes
    apply            the same on probabilities (h, w, 1): what full-resolution delivery reads
    count_components the connected components of a binary mask
    provenance_record what a store records of it: the steps applied, or none and why

A spec such as {"min_area_fraction": 0.01, "keep_largest": 2, "fill_holes": true} runs its
steps in that fixed order, whatever order the keys come in. Every step looks at whole
components, so it needs the whole working level at once: only models with a fixed working
size (`scale.size`, X-rays: 256² for lung-xray) may declare one (`card_problems`); a slide
model's working level is unbounded (invariant 3), and a tile's view of a component that
crosses its border is not the component.

Foreground is 8-connected and background 4-connected (the usual pair: a diagonal step
joins foreground, so a one-pixel diagonal gap is no hole). With 8-connected components,
no 2x2 block of working pixels holds two components, so bilinear delivery of the edited
probabilities never joins a dropped component to a kept one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

EIGHT = np.ones((3, 3), bool)  # foreground connectivity
STEPS = ("min_area_fraction", "keep_largest", "fill_holes")  # the order they run in


def check_spec(spec: Any) -> list[str]:
    """What is wrong with a post-processing spec, one phrase each naming key and value."""
    if not isinstance(spec, Mapping):
        return [f"postprocess must be an object, got {spec!r:.80}"]
    problems = [f"postprocess.{k} is not a step (known: {', '.join(STEPS)})" for k in spec if k not in STEPS]
    fraction = spec.get("min_area_fraction")
    if fraction is not None and not (_number(fraction) and 0.0 <= fraction < 1.0):
        problems.append(f"postprocess.min_area_fraction={fraction!r:.40} not in [0, 1)")
    keep = spec.get("keep_largest")
    if keep is not None and not (isinstance(keep, int) and not isinstance(keep, bool) and 1 <= keep <= 255):
        problems.append(f"postprocess.keep_largest={keep!r:.40} not an int in 1..255")
    holes = spec.get("fill_holes")
    if holes is not None and not isinstance(holes, bool):
        problems.append(f"postprocess.fill_holes={holes!r:.40} not true or false")
    return problems


def card_problems(spec: Mapping[str, Any], scale: Any, classes: int) -> list[str]:
    """What stops a card from declaring `spec`: a spec problem, a model without a fixed
    working size, or a multi-class model (its labels are an arg-max, not one threshold)."""
    if not spec:
        return []
    problems = check_spec(spec)
    if not (isinstance(scale, Mapping) and "size" in scale):
        problems.append("postprocess needs the whole working level, so a fixed working size "
                        f"(scale.size); this model's scale is {scale!r:.60} (slide models: none)")
    if classes != 1:
        problems.append(f"postprocess is for binary models (classes 1), not classes={classes}")
    return problems


def clean_mask(mask: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """The spec's steps on a binary (h, w) mask, as a new bool array: components smaller
    than min_area_fraction of the image dropped, the keep_largest largest kept, then holes
    (background not 4-connected to the border) filled."""
    out = np.asarray(mask, bool)
    fraction, keep = spec.get("min_area_fraction"), spec.get("keep_largest")
    if fraction or keep:
        labels, n = ndimage.label(out, structure=EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        wanted = sizes >= (fraction or 0.0) * out.size
        if keep:
            # ties go to the lower label (the first met in raster order): deterministic
            order = np.argsort(-sizes, kind="stable")
            wanted[order[keep:]] = False
        out = np.concatenate([[False], wanted])[labels]
    if spec.get("fill_holes"):
        out = ndimage.binary_fill_holes(out)
    return out


def apply(probs: np.ndarray, threshold: float, spec: Mapping[str, Any]) -> np.ndarray:
    """Probabilities (h, w, 1) of the whole working level with the spec applied, a new
    array: pixels of dropped components set to 0, filled holes to 1, the rest unchanged.
    Thresholding it (and its bilinear upsampling, see the module note) gives the cleaned
    mask; the stored `prob` keeps the model's own values."""
    if not spec:
        return probs
    raw = probs[..., 0] >= threshold
    cleaned = clean_mask(raw, spec)
    out = probs.copy()
    out[raw & ~cleaned, 0] = 0.0
    out[cleaned & ~raw, 0] = 1.0
    return out


def provenance_record(spec: Mapping[str, Any], enabled: bool) -> dict[str, Any]:
    """What a store's provenance says of its mask's post-processing: the steps applied,
    or none and why (the card declares none, or the run said --no-postprocess)."""
    if not spec:
        return {"applied": {}, "why": "the model card declares none"}
    if not enabled:
        return {"applied": {}, "declared": dict(spec), "why": "--no-postprocess"}
    return {"applied": dict(spec)}


def count_components(mask: np.ndarray) -> int:
    """Connected components (8-connected) of a binary mask."""
    return int(ndimage.label(np.asarray(mask, bool), structure=EIGHT)[1])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
