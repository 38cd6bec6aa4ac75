"""The model on its device: batches of normalised windows in, probabilities out.

Device and precision are chosen automatically: CUDA when present (bf16 autocast where the
GPU supports it, else fp16; pinned host memory for the copies), else CPU with bf16 autocast
when the CPU has native bf16 (AMX / AVX512-BF16), else fp32. channels_last throughout.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.engine import process_env
from pipeline.errors import ConfigError
from pipeline.models import SegmentationModel, fold_batchnorm

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX or AVX512-BF16)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:  # not Linux: ask oneDNN's view of the CPU instead
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device; None means plain fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


class Predictor:
    """Wraps a copy of a model for inference: BatchNorm folded into the convs, device,
    autocast, channels_last, optional compile and flip test-time augmentation. Call with
    (N, H, W, C) float32 windows of one shape."""

    def __init__(self, model: SegmentationModel, config: RunConfig, device: torch.device | None = None):
        self.device = device or choose_device()
        self.dtype = autocast_dtype(config.precision, self.device)
        self.classes = model.classes
        self.tta = config.tta
        self.batch_size = config.batch_size
        if self.device.type == "cpu":
            process_env.keep_freed_buffers()
        model = fold_batchnorm(model).to(self.device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model) if config.compile else model
        log.info("predictor on %s, autocast %s", self.device, self.dtype)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """(N, H, W, C) normalised windows -> (N, H, W, K) probabilities, in batches; on
        CUDA out-of-memory the batch is halved and the same windows are tried again."""
        out, start = [], 0
        while start < len(windows):
            batch = windows[start : start + self.batch_size]
            try:
                out.append(self._forward(batch))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: window batch halved to %d", self.batch_size)
                continue
            start += len(batch)
        return np.concatenate(out)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        # NHWC numpy viewed as NCHW is already channels_last in memory: no copy on CPU.
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            probs = self._probs(x)
            if self.tta:
                for dims in ((3,), (2,)):
                    probs = probs + self._probs(x.flip(dims)).flip(dims)
                probs = probs / 3
        return probs.permute(0, 2, 3, 1).float().cpu().numpy()

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        return torch.sigmoid(logits) if self.classes == 1 else torch.softmax(logits, dim=1)
