"""Segmentation losses and overlap scores.

Binary models (1 output channel, sigmoid) train on BCE-with-logits + soft Dice; multi-class
models (softmax, channel 0 = background) on cross-entropy + soft Dice over the foreground
classes. UNet++ with deep supervision averages the loss over its heads (Zhou et al. 2018).
Losses are computed in float32 whatever the autocast dtype: bf16 sums over a batch of
pixels lose too many digits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SMOOTH = 1.0  # soft Dice smoothing: keeps empty-mask batches finite


def deep_supervision_loss(heads: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Mean of `segmentation_loss` over each head's logits (N, K, H, W)."""
    return torch.stack([segmentation_loss(h, target) for h in heads]).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + Dice (K = 1) or CE + Dice (K > 1); target (N, H, W) holds class indices."""
    logits = logits.float()
    if logits.shape[1] == 1:
        truth = (target > 0).float()[:, None]
        bce = F.binary_cross_entropy_with_logits(logits, truth)
        return bce + soft_dice_loss(torch.sigmoid(logits), truth)
    ce = F.cross_entropy(logits, target)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    probs = torch.softmax(logits, dim=1)
    return ce + soft_dice_loss(probs[:, 1:], onehot[:, 1:])


def soft_dice_loss(probs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per class over the whole batch (N, K, H, W), averaged over classes."""
    dims = (0, 2, 3)
    overlap = (probs * truth).sum(dims)
    total = probs.sum(dims) + truth.sum(dims)
    return (1 - (2 * overlap + SMOOTH) / (total + SMOOTH)).mean()


def dice_iou(predicted: np.ndarray, truth: np.ndarray, classes: int) -> tuple[float, float]:
    """Dice and IoU of label maps, averaged over the foreground labels."""
    return overlap_scores(overlap_counts(predicted, truth, classes))


def overlap_counts(predicted: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """(foreground labels, 3) int64: intersection, predicted and true pixel counts. The
    foreground labels are 1 for a binary model (classes=1), 1..classes-1 for a softmax one.
    Counts add up, so patches of one image can be pooled before scoring."""
    return np.array([[np.count_nonzero((predicted == k) & (truth == k)),
                      np.count_nonzero(predicted == k), np.count_nonzero(truth == k)]
                     for k in range(1, max(classes, 2))], dtype=np.int64)


def overlap_scores(counts: np.ndarray) -> tuple[float, float]:
    """Dice and IoU from `overlap_counts`, averaged over labels; two empty masks agree."""
    inter, pred, true = counts[:, 0], counts[:, 1], counts[:, 2]
    total, union = pred + true, pred + true - inter
    dice = np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(dice.mean()), float(iou.mean())
