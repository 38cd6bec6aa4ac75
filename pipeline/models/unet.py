"""U-Net (Ronneberger et al. 2015), in the layout of the common PyTorch implementation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.base import SegmentationModel
from pipeline.models.blocks import DoubleConv, Down, OutConv, Up, run_block

UNET_FILTERS = (64, 128, 256, 512, 1024)


class UNet(SegmentationModel):
    """Encoder of `len(filters) - 1` Down blocks, mirrored decoder of Up blocks.

    With bilinear upsampling the widths below the bottleneck halve (as in the reference
    implementation), so the concatenations keep their widths without transposed convs.
    """

    arch = "unet"

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        filters: Sequence[int] = UNET_FILTERS,
        bilinear: bool = False,
        align_corners: bool = False,
        checkpointing: bool = False,
    ):
        filters = list(filters)
        super().__init__(
            dict(in_channels=in_channels, classes=classes, filters=filters,
                 bilinear=bilinear, align_corners=align_corners)
        )
        self.depth = len(filters) - 1
        self.classes = classes
        self.checkpointing = checkpointing
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(in_channels, filters[0])
        self.downs = nn.ModuleList(
            Down(filters[i], filters[i + 1] // (factor if i == self.depth - 1 else 1))
            for i in range(self.depth)
        )
        self.ups = nn.ModuleList(
            Up(filters[i + 1], filters[i] // (factor if i > 0 else 1), bilinear, align_corners)
            for i in reversed(range(self.depth))
        )
        self.outc = OutConv(filters[0], classes)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = [run_block(self.inc, x, checkpointing=self.checkpointing)]
        for down in self.downs:
            skips.append(run_block(down, skips[-1], checkpointing=self.checkpointing))
        x = skips.pop()
        for up in self.ups:
            x = run_block(up, x, skips.pop(), checkpointing=self.checkpointing)
        return self.outc(x)
