"""`segment`: one image in, its output store out, in this process (no Ray, no Prefect)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline import cards, stages
from pipeline.config import RunConfig
from pipeline.engine import process_env
from pipeline.engine.pool import RunPool, local_pool

log = logging.getLogger(__name__)


def segment(input: str | Path, model: str | Path, out: str | Path, *,
            pool: RunPool | None = None, **config: Any) -> Path:  # fmt: skip
    """Segment one image with a checkpoint path or shipped model name; returns the output
    store's path. Config names are RunConfig's (tile, halo, blend, mode, prune_level,
    precision, tissue, ...). `pool` (`engine.pool.local_pool(model, config)`, closed by the
    caller) keeps the model loaded over many calls; by default one is opened per call."""
    process_env.keep_freed_buffers()  # first: before this run starts any thread
    run = RunConfig().with_(**config)
    model_path = str(cards.resolve(model))
    cards.check_settings(cards.read_card(model_path), run.mode, run.prune_level, model_path)
    job = stages.ingest(str(input), model_path, run, str(out))
    stages.plan(job, run)
    with nullcontext(pool) if pool is not None else local_pool(model_path, run) as tiles:
        stages.infer(job, run, tiles)
    summary = stages.finalize(job)
    if summary["state"] == "complete":
        stages.export(job, run)
    else:  # as the per-image flow and batches do: exports wait for a complete output
        log.warning("%s: %s; exports wait for a complete output", job.image_id, summary["state"])
    log.info("%s: %s %s", job.image_id, summary["state"], summary["counts"])
    return Path(job.store_path)
