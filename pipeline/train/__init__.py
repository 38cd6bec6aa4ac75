"""Training: config, loop, data, augmentation, losses, state files, UNet++ mode choice and
distributed (Ray Train) runs, one module each.

`TrainConfig` is imported eagerly (torch-free: the CLI builds its options from it); `train`
on first use, so that importing the package for the config does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.train.config import TrainConfig

if TYPE_CHECKING:
    from pipeline.train.distributed import train

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from pipeline.train.distributed import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
