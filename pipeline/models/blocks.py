"""Building blocks shared by U-Net and UNet++ (Ronneberger 2015; Zhou 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    """(3×3 conv → BatchNorm → ReLU) × 2; the U-Net block and UNet++'s VGG node."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None, bias: bool = False):
        super().__init__()
        mid_ch = mid_ch or out_ch
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, kernel_size=3, padding=1, bias=bias),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, kernel_size=3, padding=1, bias=bias),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2×2 max-pool, then DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Upsample2x(nn.Module):
    """Bilinear ×2. align_corners=False keeps it translation-equivariant, which tiling needs;
    True exists only to reproduce weights trained with the reference implementations."""

    def __init__(self, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)


class Up(nn.Module):
    """Upsample ×2 (bilinear or transposed conv), concatenate the skip, DoubleConv.

    No padding to the skip's size here: the model pads its input once to a multiple of
    2^depth, so every skip already matches.
    """

    def __init__(self, in_ch: int, out_ch: int, bilinear: bool, align_corners: bool = False):
        super().__init__()
        if bilinear:
            self.up = Upsample2x(align_corners)
            self.conv = DoubleConv(in_ch, out_ch, in_ch // 2)
        else:
            self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class OutConv(nn.Module):
    """1×1 conv to class logits."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of `multiple`: reflect, or replicate where the input
    is too small to reflect. The rule depends only on the size, so a tile whose origin is
    aligned to `multiple` and ends at the image edge is padded exactly as the whole image."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def run_block(block: nn.Module, *inputs: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """Call a block, through activation checkpointing when training with it enabled."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)
