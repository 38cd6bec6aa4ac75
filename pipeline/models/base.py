"""What every segpipe model shares: padding to its multiple, cropping back, its config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.blocks import pad_to_multiple


class SegmentationModel(nn.Module):
    """Subclasses set `arch`, `depth`, `classes` and implement `forward_padded`.

    `forward` takes any H×W, pads once to a multiple of 2^depth and crops the logits back,
    so output size always equals input size.
    """

    arch: str
    depth: int
    classes: int

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)

    @property
    def multiple(self) -> int:
        """Total downsampling: tile origins must sit on this grid for exact tiling."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return self.forward_padded(pad_to_multiple(x, self.multiple))[..., :h, :w]

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
