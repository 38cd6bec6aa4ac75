"""What a tile's writes must be before they reach the store (pure): invariant 1 (a tile
writes only whole chunks it owns) and the pixels' shapes, types and values, each refused
with a StoreError naming the store, the tile and the value."""

from __future__ import annotations

import numpy as np

from pipeline.engine.tiling import Box
from pipeline.store.errors import StoreError
from pipeline.store.layout import StoreLayout


def encode_prob(prob: np.ndarray, box: Box, layout: StoreLayout, where: str) -> np.ndarray:
    """(h, w, C) probabilities of working-level ``box`` as stored: (C, h, w) in the layout's
    dtype (uint8 holds round(p * 255))."""
    expected = (*box.shape, len(layout.classes))
    if prob.shape != expected:
        raise StoreError(f"{where}: prob shape {prob.shape}, expected {expected}")
    if not np.isfinite(prob).all():
        raise StoreError(f"{where}: prob holds NaN or inf")
    if layout.prob_dtype == "uint8":
        stored = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        stored = prob.astype(layout.prob_dtype)
    return stored.transpose(2, 0, 1)


def check_mask(mask: np.ndarray, box: Box, layout: StoreLayout, where: str) -> np.ndarray:
    """``mask`` when it is the uint8 labels of full-resolution ``box``, 0..classes."""
    if box.is_empty:
        return mask
    if mask.shape != box.shape or mask.dtype != np.uint8:
        raise StoreError(f"{where}: mask {mask.shape} {mask.dtype}, expected {box.shape} uint8")
    n = len(layout.classes)
    if mask.size and int(mask.max()) > n:
        raise StoreError(f"{where}: mask label {int(mask.max())} > {n} classes")
    return mask


def check_piece(box: Box, owned: Box, layout: StoreLayout, where: str) -> None:
    """``box`` must be whole full-resolution chunks inside the tile's ``owned`` box: start
    on the chunk grid, end on it or at the image's edge."""
    chunk, (height, width) = layout.full_chunk, layout.full_hw
    aligned = (box.y0 % chunk == 0 and box.x0 % chunk == 0
               and (box.y1 % chunk == 0 or box.y1 == height)
               and (box.x1 % chunk == 0 or box.x1 == width))  # fmt: skip
    if box.is_empty or not aligned or not owned.contains(box):
        raise StoreError(f"{where}: mask piece {box} is not whole chunks of its own {owned}")
