"""The archive path of a collection run: small images in batches, one Prefect task each.

An image whose plan is one tile (`pipeline.batch.one_tile`: every image through a
fixed-size model) costs the model a few tens of milliseconds; its own subflow and five
task runs cost Prefect's API about a second, and on a loaded machine the embedded server
fell over under 40 writes per image. Such images go through `batch_task` instead: one task
run per BATCH_IMAGES images, calling `pipeline.batch.segment_batch`, which runs each image
through the same stages (its store is the per-image path's, bit for bit). Per-image results
still reach the run table, the Prefect table artifact and the run record: the task returns
one `ImageResult` per image.

Slides, images through scale-by-µm/px models and remote inputs (DICOMweb, fsspec URLs,
fetched one by one) keep the per-image subflow.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import pacs, progress, report
from flows.discover import Source
from flows.report import ImageResult
from flows.tasks import private_names
from pipeline.batch import (
    BATCH_IMAGES,
    BatchItem,
    BatchOutcome,
    one_tile,
    segment_batch,
)
from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.engine.pool import RunPool


def batchable(source: Source, card: ModelCard, config: RunConfig) -> bool:
    """Whether `source` goes through a batch: a local input through a model that plans one
    tile for any image."""
    return not source.is_remote and one_tile(card, config)


def batches(sources: Sequence[Source], size: int = BATCH_IMAGES) -> list[list[Source]]:
    return [list(sources[i : i + size]) for i in range(0, len(sources), size)]


@task(name="images", cache_policy=NO_CACHE)
def batch_task(sources: list[Source], model_path: str, out: str, config: RunConfig,
               pool: RunPool) -> list[ImageResult]:  # fmt: skip
    """Segment a batch of small images; one result per image, a failed one for each image
    that raised (the others complete). The task's name in Prefect carries only the image
    ids' count; each result names its image by id."""
    logger = get_run_logger()
    by_id = {s.image_id: s for s in sources}
    items = [BatchItem(s.image_id, s.uri.removeprefix("file://"), private=private_names(s)) for s in sources]

    def on_done(outcome: BatchOutcome) -> None:
        state = outcome.summary["state"] if outcome.summary else "failed"
        progress.emit(progress.Event("finished", outcome.image_id, state=state))

    # no "started" events: a bar per one-tile image would be 32 bars at once; the run's
    # images bar counts each as it finishes
    outcomes = segment_batch(items, model_path, config, out, pool, on_done=on_done)
    results = [_result(o) for o in outcomes]
    for result in results:
        if result.error:
            logger.error(result.error)
    logger.info("batch of %d: %s", len(results),
                ", ".join(f"{k} {v}" for k, v in report.totals(results).items() if v))  # fmt: skip
    return pacs.stored(results, by_id, config)  # --store: the complete images' SEGs to the PACS


def _result(outcome: BatchOutcome) -> ImageResult:
    if outcome.summary is None:
        return report.failed(outcome.image_id, outcome.error or RuntimeError("no result"), outcome.seconds)
    return report.from_summary(outcome.summary, outcome.seconds, outcome.exports)
