"""Shared pieces of the benchmark scripts: synthetic slides and images, the models they run,
the machine they ran on, peak RSS, one configuration per subprocess, tables and goals."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine import process_env
from pipeline.engine.predictor import Predictor
from pipeline.models import build_model, checkpoint

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("SEGPIPE_REAL_DATA", ROOT.parent / "shared/data/real"))
SLIDE = REAL_DATA / "wsi-tcga-cr-7395/tcga-cr-7395-01a-01-ts1.svs"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_model(path: Path, filters=(4, 8, 16), in_channels: int = 3) -> str:
    torch.manual_seed(0)
    model = build_model("unet", in_channels=in_channels, classes=1, filters=list(filters))
    checkpoint.save(model, ModelCard(arch="", config={}, name="tiny"), path)
    return str(path)


def synthetic_slide(path: Path, size: int, tile: int = 512, tissue_every: int = 1,
                    disc: float | None = None) -> Path:
    """A size×size tiled RGB TIFF written tile by tile (never held whole): textured pink
    tissue on every `tissue_every`-th tile, white elsewhere; with `disc`, tissue only on the
    tiles whose centre lies within disc·size/2 of the slide's centre (a section on glass)."""
    rng = np.random.default_rng(0)
    texture = np.stack([200 + rng.integers(0, 40, (tile, tile)), 80 + rng.integers(0, 60, (tile, tile)),
                        160 + rng.integers(0, 50, (tile, tile))], axis=-1).astype(np.uint8)
    white = np.full((tile, tile, 3), 245, np.uint8)
    n = -(-size // tile)

    def is_tissue(i: int) -> bool:
        if disc is None:
            return i % tissue_every == 0
        cy, cx = (i // n + 0.5) * tile, (i % n + 0.5) * tile
        return np.hypot(cy - size / 2, cx - size / 2) <= disc * size / 2

    def tiles():
        for i in range(n * n):
            yield texture if is_tissue(i) else white

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     photometric="rgb", compression="zlib", bigtiff=True)
    return path


def as_segpipe_runs(model: torch.nn.Module) -> torch.nn.Module:
    """The very module segpipe's predictor runs on CPU (BatchNorm folded, channels_last)."""
    return Predictor(model, RunConfig(), torch.device("cpu")).model


def cache_dir() -> Path:
    """Where inputs and exact answers are kept between runs (SEGPIPE_BENCH_CACHE)."""
    path = Path(os.environ.get("SEGPIPE_BENCH_CACHE", Path(tempfile.gettempdir()) / "segpipe-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_image(size: int) -> tuple[np.ndarray, str]:
    """A size×size RGB uint8 image and where it came from: the centre of the real TCGA H&E
    slide when it is present and large enough, else a synthetic textured image."""
    if SLIDE.is_file():
        from pipeline.io import open_image

        with open_image(SLIDE) as slide:
            h, w, _ = slide.levels[0]
            if min(h, w) >= size:
                y, x = (h - size) // 2, (w - size) // 2
                return slide.read_region(0, y, x, size, size)[..., :3], f"TCGA H&E crop {size}x{size}"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3)).astype(np.uint8)
    blocks = np.kron(base, np.ones((16, 16, 1), np.uint8))[:size, :size]
    noise = rng.integers(0, 32, (size, size, 3), dtype=np.uint8)
    return (blocks // 2 + noise + 64).astype(np.uint8), f"synthetic {size}x{size}"


def unetpp_model(path: Path, calibration: np.ndarray, filters: Sequence[int] | None = None,
                 logit_std: float = 4.0) -> str:
    """The full-size UNet++ (or `filters`), seed 0, saved as a checkpoint. Its head is
    rescaled so that its logits on `calibration` (an RGB uint8 image) have median 0 and
    standard deviation `logit_std`: untrained weights then give a mask with both classes
    and probabilities spread over (0, 1) as a trained model's are, so Δprob and mask
    agreement mean something."""
    torch.manual_seed(0)
    config = {} if filters is None else {"filters": list(filters)}
    model = build_model("unetpp", in_channels=3, classes=1, **config).eval()
    x = torch.from_numpy(calibration).permute(2, 0, 1)[None].float() / 255
    head = model.heads[0].conv
    with torch.inference_mode():
        logits = model(x)
        scale = logit_std / logits.std()
        head.weight *= scale
        head.bias.copy_((head.bias - logits.median()) * scale)
    checkpoint.save(model, ModelCard(arch="", config={}, name="unetpp-untrained"), path)
    return str(path)


def machine() -> str:
    """One line naming the machine, the torch build and the load when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"load average {load()}")


def load() -> str:
    """The 1/5/15-minute load averages: other work on the machine slows every figure."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def in_worker_env() -> None:
    """Run this script again, from the start, in the environment segpipe's tile workers
    start with, unless it already is: those settings count only from a process's start."""
    missing = process_env.worker_env()
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


def run_one(script: str | Path, args: Sequence[str], worker_env: bool = False) -> dict[str, Any]:
    """Run `script args` in a fresh Python (its own peak RSS), in segpipe's worker
    environment or in this one, and return the JSON object it prints last."""
    env = {**os.environ, **(process_env.worker_env() if worker_env else {})}
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats keep the precision they were formatted with by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def goal(text: str, met: bool, figure: str) -> str:
    """One line stating a goal, whether this run met it, and the figure that decides."""
    return f"- Goal: {text}: **{'met' if met else 'NOT met'}** ({figure})"
