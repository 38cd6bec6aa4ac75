"""UNet++ (Zhou et al. 2018): nested dense skip pathways with deep supervision.

Node X(i, j) sits at depth i (downsampling 2^i) after j convolution stages along its skip
pathway. X(i, 0) is the encoder; X(i, j>0) takes all X(i, k<j) and the upsampled X(i+1, j-1).
Heads are 1×1 convs on X(0, 1..depth). The paper's modes:
  accurate: the mean of all heads' logits;
  fast, prune level L: only the nodes X(0, L) depends on (i + j <= L) are computed, and
  head L is the output — the pruned network of the paper, sharing the full model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.cards import check_mode
from pipeline.models.base import SegmentationModel
from pipeline.models.blocks import (
    DoubleConv,
    OutConv,
    Upsample2x,
    pad_to_multiple,
    run_block,
)

UNETPP_FILTERS = (32, 64, 128, 256, 512)


class UNetPlusPlus(SegmentationModel):
    """UNet++ with nodes keyed `x_{i}_{j}` and optional deep supervision."""

    arch = "unetpp"

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        filters: Sequence[int] = UNETPP_FILTERS,
        deep_supervision: bool = False,
        mode: str = "accurate",
        prune_level: int | None = None,
        align_corners: bool = False,
        checkpointing: bool = False,
    ):
        filters = list(filters)
        depth = len(filters) - 1
        prune_level = depth if prune_level is None else prune_level
        check_mode(mode, prune_level, depth, deep_supervision)
        super().__init__(
            dict(in_channels=in_channels, classes=classes, filters=filters,
                 deep_supervision=deep_supervision, mode=mode, prune_level=prune_level,
                 align_corners=align_corners)
        )
        self.depth = depth
        self.classes = classes
        self.deep_supervision = deep_supervision
        self.mode = mode
        self.prune_level = prune_level
        self.checkpointing = checkpointing
        self.pool = nn.MaxPool2d(2)
        self.up = Upsample2x(align_corners)
        self.nodes = nn.ModuleDict()
        for i in range(depth + 1):
            self.nodes[f"x_{i}_0"] = DoubleConv(in_channels if i == 0 else filters[i - 1],
                                                filters[i], bias=True)
        for j in range(1, depth + 1):
            for i in range(depth + 1 - j):
                self.nodes[f"x_{i}_{j}"] = DoubleConv(filters[i] * j + filters[i + 1],
                                                      filters[i], bias=True)
        n_heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList(OutConv(filters[0], classes) for _ in range(n_heads))

    def set_mode(self, mode: str, prune_level: int | None = None) -> None:
        """Switch between accurate and fast (pruned) inference without touching weights."""
        prune_level = self.depth if prune_level is None else prune_level
        check_mode(mode, prune_level, self.depth, self.deep_supervision)
        self.mode, self.prune_level = mode, prune_level
        self.config.update(mode=mode, prune_level=prune_level)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deep_supervision:
            return self.heads[0](self.nested(x, self.depth)[0][self.depth])
        if self.mode == "fast":
            top = self.nested(x, self.prune_level)[0]
            return self.heads[self.prune_level - 1](top[self.prune_level])
        return torch.stack(self.head_logits_padded(x)).mean(dim=0)

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, each the input's size: deep supervision's training targets."""
        h, w = x.shape[-2:]
        return [y[..., :h, :w] for y in self.head_logits_padded(pad_to_multiple(x, self.multiple))]

    def head_logits_padded(self, x: torch.Tensor) -> list[torch.Tensor]:
        top = self.nested(x, self.depth)[0]
        if not self.deep_supervision:
            return [self.heads[0](top[self.depth])]
        return [head(top[j + 1]) for j, head in enumerate(self.heads)]

    def nested(self, x: torch.Tensor, level: int) -> list[list[torch.Tensor]]:
        """Compute exactly the nodes X(i, j) with i + j <= level; rows indexed [i][j]."""
        grid: list[list[torch.Tensor]] = [[] for _ in range(level + 1)]
        for s in range(level + 1):
            encoder_in = x if s == 0 else self.pool(grid[s - 1][0])
            grid[s].append(self._node(s, 0, encoder_in))
            for j in range(1, s + 1):
                i = s - j
                inputs = torch.cat([*grid[i][:j], self.up(grid[i + 1][j - 1])], dim=1)
                grid[i].append(self._node(i, j, inputs))
        return grid

    def _node(self, i: int, j: int, x: torch.Tensor) -> torch.Tensor:
        return run_block(self.nodes[f"x_{i}_{j}"], x, checkpointing=self.checkpointing)
