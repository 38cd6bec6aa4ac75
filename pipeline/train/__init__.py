"""Training: config, loop, data, augmentation, losses, distributed (Ray Train)."""

from pipeline.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
