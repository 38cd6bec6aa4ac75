"""The flows: `segment_image` (one image through ingest → plan → infer → finalize →
export) and `segment_collection` (discover, skip what is already done, run the rest a few
at a time on one shared pool of Ray workers, report). Small images (one tile each) run in
batches, one task per batch (flows/batch.py), not a subflow each.

Both run on Prefect's embedded server when PREFECT_API_URL is unset, and on a real server
when it is set. An image that fails is one line in the report; the others go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows import pacs, progress, report
from flows.batch import batch_task, batchable, batches
from flows.discover import Inputs, Source
from flows.outcome import keep, outcome
from flows.report import ImageResult
from flows.reuse import reusable
from flows.tasks import (
    discover_task,
    export_task,
    finalize_task,
    infer_task,
    ingest_task,
    plan_task,
    select_task,
)
from pipeline import cards, selection
from pipeline.batch import BATCH_IMAGES, one_tile
from pipeline.config import RunConfig
from pipeline.engine.pool import RunPool
from pipeline.io import location
from pipeline.io.dicomweb import split_inputs
from pipeline.store import LOCK_POLL_S, StoreLock

DEFAULT_CONCURRENCY = 2

# Prefect gives the loggers of PREFECT_LOGGING_EXTRA_LOGGERS its API handler but no level:
# they would inherit the root's WARNING, and a run's log in Prefect would miss the
# pipeline's INFO lines (tiles to run, resumes, retries, skipped exports).
for _name in ("pipeline", "flows"):
    logging.getLogger(_name).setLevel(logging.INFO)
TABLE_KEY = "segpipe-run"


def _image_run_name() -> str:
    """The image's non-identifying id (Prefect stores run names; invariant 8)."""
    source = flow_run.parameters["source"]
    return source.image_id if isinstance(source, Source) else str(source["image_id"])


@flow(name="segment-image", flow_run_name=_image_run_name)
def segment_image(source: Source, model: str, out: str, config: RunConfig | None = None,
                  pool: RunPool | None = None) -> ImageResult | State:
    """Segment one image (`Source.of(path or fsspec URL, out)`) with a shipped model name
    or checkpoint path into OUT/<image_id>.zarr, plus its exports. Prefect records the
    source as its image id only. `pool` is the run's worker pool (segment_collection passes
    its own); without one, Ray workers start for this image. An image left partial ends
    the run Failed, its ImageResult as the state's data."""
    run = config or RunConfig()
    logger = get_run_logger()
    start = time.perf_counter()
    model_path = str(cards.resolve(model))
    item = source
    job = ingest_task(item, model_path, run, out)
    plan_task(job, run)
    with nullcontext(pool) if pool is not None else _ray_pool(model_path, run) as tiles:
        infer_task(job, run, tiles)
    summary = finalize_task(job)
    exports: dict[str, str] = {}
    if summary["state"] == "complete":
        exports = export_task(job, run, source=item)
    else:
        logger.warning("%s: %d tiles failed; exports wait for a complete output",
                       job.image_id, summary["failed_total"])  # fmt: skip
    made = report.from_summary(summary, time.perf_counter() - start, exports)
    [result] = pacs.stored([made], {item.image_id: item}, run)  # --store: its SEG to the PACS
    logger.info("%s: %s in %.1f s", job.image_id, result.state, result.seconds)
    if _is_top_level():
        create_table_artifact([result.row()], key=TABLE_KEY, description=f"segment-image {job.image_id}")
    if not result.ok:  # a partial image is a failed run: automations and the UI must see it
        failed_tiles = summary["failed_total"]  # or, complete, its SEG not stored (result.error)
        message = result.error or f"{job.image_id}: {result.state}, {failed_tiles} tiles failed"
        return keep(Failed(message=message, data=result))
    return keep(result)


@flow(name="segment-collection")
def segment_collection(inputs: Inputs | list[str], model: str, out: str, config: RunConfig | None = None,
                       concurrency: int = DEFAULT_CONCURRENCY) -> list[ImageResult] | State:
    """Segment every image under `inputs` (folders, globs, list files, fsspec URLs) into
    OUT. Given as `Inputs` (as the CLI does), the inputs stay out of Prefect's stored
    parameters; a deployment's list is its operator's, stored with the deployment. Images
    the selection rules (`--select`, else the model card's) do not take are reported
    skipped with the reason, and nothing of them is read past the header. Images whose
    output is already complete for the same input content, model and settings are reported
    and not run again; up to `concurrency` images run at once, all on one pool of Ray
    workers; a failed image is reported and the others go on. Any partial or failed image
    ends the run Failed, the results list as the state's data (`results(state)`)."""
    run = config or RunConfig()
    logger = get_run_logger()
    model_path = str(cards.resolve(model))
    card = cards.read_card(model_path)
    cards.check_settings(card, run.mode, run.prune_level, model_path)
    rules = run.select if run.select is not None else tuple(card.selection)
    sources, queries = _sources(inputs if isinstance(inputs, Inputs) else Inputs(inputs), out, rules, run)
    progress.emit(progress.Event("discovered", total=len(sources)))
    skipped = _not_selected(sources, rules)
    selected = [s for s in sources if s.image_id not in skipped]
    wanted = {"model": {"sha256": location.sha256_cached(model_path)}, "run": run.to_dict()}
    reused = reusable(selected, out, wanted, run)
    todo = [s for s in selected if s.image_id not in reused]
    logger.info("%d images: %d not selected, %d already complete, %d to run", len(sources), len(skipped),
                len(reused), len(todo))  # fmt: skip
    if todo:
        _connect(run)  # here, in the flow's thread: Ray starts best from the main thread
    with _ray_pool(model_path, run, one_tile(card, run)) as pool:
        fresh = _run_bounded(todo, model_path, out, run, pool, max(1, concurrency), wanted, card)
    order = {s.image_id: i for i, s in enumerate(sources)}
    results = sorted([*skipped.values(), *reused.values(), *fresh], key=lambda r: order[r.image_id])
    results = _report(results, out, {s.image_id: s.uri for s in sources} if run.keep_paths else {})
    pacs.advance_watermarks(out, queries, results)
    flagged = run.qc_flag_exit and any(r.flagged for r in results)
    if flagged or any(not r.ok for r in results):  # a bad night is a Failed run, with every result as data
        counts = report.totals(results)
        names = ("partial", "failed", "qc flagged") if run.qc_flag_exit else ("partial", "failed")
        problems = ", ".join(f"{counts[k]} {k}" for k in names if counts[k])
        return keep(Failed(message=f"{problems} of {len(results)} images", data=results))
    return keep(results)


def _sources(inputs: Inputs, out: str, rules: tuple[str, ...], run: RunConfig) -> tuple[list[Source], list[pacs.Query]]:
    """The run's images: discovered under its folders, globs, list files and fsspec URLs,
    and queried from its DICOMweb sources (each query kept, for its watermark)."""
    local, remote = split_inputs(inputs.items)
    sources = discover_task(Inputs(local), out) if local else []
    queries = [pacs.query_task(Inputs([item]), out, rules, run) for item in remote]
    found = {s.image_id: s for s in [*sources, *(s for q in queries for s in q.sources)]}  # each image once
    return list(found.values()), queries


def _not_selected(sources: list[Source], rules: tuple[str, ...]) -> dict[str, ImageResult]:
    """The skipped result of each source the rules do not select (none without rules)."""
    if not selection.parse_rules(rules) or not sources:
        return {}
    reasons = select_task(sources, rules)
    for image_id in reasons:
        progress.emit(progress.Event("finished", image_id, state="skipped"))
    return {image_id: report.skipped(image_id, why) for image_id, why in reasons.items()}


@task(name="image", cache_policy=NO_CACHE)
def image_task(source: Source, model_path: str, out: str, config: RunConfig, pool: RunPool) -> ImageResult:
    """One image's subflow; its failure becomes a failed result instead of an exception,
    so the collection goes on. (A task around the subflow lets images run concurrently.)"""
    start = time.perf_counter()
    state = segment_image(source, model_path, out, config, pool, return_state=True)
    value = outcome(state)
    if isinstance(value, ImageResult):  # complete, or partial (a Failed state carrying it)
        result = value
    else:
        exc = value if isinstance(value, BaseException) else RuntimeError(state.message or state.name)
        result = report.failed(source.image_id, exc, time.perf_counter() - start)
        get_run_logger().error(result.error)
    progress.emit(progress.Event("finished", source.image_id, state=result.state))
    return result


def _run_bounded(todo: list[Source], model_path: str, out: str, config: RunConfig, pool: RunPool,
                 limit: int, wanted: dict[str, Any], card: cards.ModelCard) -> list[ImageResult]:  # fmt: skip
    """Run the images, at most `limit` units at a time; results in the order they finish.
    A unit is one image's subflow, or a batch of small images (flows/batch.py) in one task.

    Each image runs under its output's lock (pipeline/store/lock.py). One that another run
    holds is put aside and taken up when nothing else is left: once its lock is ours, it
    is reused when that run completed it (no tile runs twice), else it runs here."""
    queue, results = deque(_units(todo, card, config, limit)), []
    running: dict[PrefectFuture, tuple[list[Source], list[StoreLock]]] = {}
    aside: list[tuple[Source, StoreLock]] = []
    try:
        while queue or running or aside:
            while queue and len(running) < limit:
                batched, unit = queue.popleft()
                locked = []
                for source in unit:
                    lock = StoreLock(out, source.image_id)
                    if lock.try_acquire():
                        locked.append((source, lock))
                    else:
                        get_run_logger().info("%s: another run is working on it; taken up last", source.image_id)
                        aside.append((source, lock))
                if locked:
                    sources = [s for s, _ in locked]
                    future = (batch_task.submit(sources, model_path, out, config, pool) if batched
                              else image_task.submit(sources[0], model_path, out, config, pool))  # fmt: skip
                    running[future] = (sources, [lock for _, lock in locked])
            if running:
                finished = next(iter(as_completed(running)))
                sources, locks = running.pop(finished)
                for lock in locks:
                    lock.release()
                results.extend(_unit_results(finished, sources))
            elif aside:
                source, lock = _first_released(aside)
                done = reusable([source], out, wanted, config)
                if source.image_id in done:
                    lock.release()
                    results.append(done[source.image_id])
                else:
                    running[image_task.submit(source, model_path, out, config, pool)] = ([source], [lock])
    finally:  # stopped midway (its Prefect API gone: flows/offline.py runs the rest): no image stays locked
        for _, locks in running.values():
            for lock in locks:
                lock.release()
    return results


def _units(todo: list[Source], card: cards.ModelCard, config: RunConfig, limit: int) -> list[tuple[bool, list[Source]]]:
    """(batched, sources) per unit of work: small images in batches (spread over `limit`
    batches when there are few, so that the run's concurrency is used), the others alone."""
    small = [s for s in todo if batchable(s, card, config)]
    size = max(1, min(BATCH_IMAGES, -(-len(small) // limit)))
    taken = {s.image_id for s in small}
    return [*((True, b) for b in batches(small, size)), *((False, [s]) for s in todo if s.image_id not in taken)]


def _unit_results(finished: PrefectFuture, sources: list[Source]) -> list[ImageResult]:
    """A unit's results; a batch task that raised (not an image in it: those are results)
    fails each of its images with its error."""
    value = finished.result(raise_on_failure=False)
    if isinstance(value, ImageResult):
        return [value]
    if isinstance(value, list):
        return value
    exc = value if isinstance(value, BaseException) else RuntimeError(f"batch ended with {value!r}")
    failed = [report.failed(s.image_id, exc) for s in sources]
    for result in failed:
        get_run_logger().error(result.error)
        progress.emit(progress.Event("finished", result.image_id, state="failed"))
    return failed


def _first_released(aside: list[tuple[Source, StoreLock]]) -> tuple[Source, StoreLock]:
    """Wait until another run lets go of one of the images put aside; take it (its lock
    now held here) out of the list."""
    while True:
        for i, (_, lock) in enumerate(aside):
            if lock.try_acquire():
                return aside.pop(i)
        time.sleep(LOCK_POLL_S)


def _connect(config: RunConfig) -> None:
    from pipeline.workers import connect

    connect(config)


def _ray_pool(model_path: str, config: RunConfig, small_images: bool = False) -> RunPool:
    """The run's tile workers on Ray (they start on the first image with work)."""
    from pipeline.workers import ray_pool

    return ray_pool(model_path, config, small_images=small_images)


def _report(results: list[ImageResult], out: str, paths: dict[str, str]) -> list[ImageResult]:
    """Log the totals and each problem on one line (image ids), write the table artifact
    and the run record beside the outputs; `paths` (image id -> input, --keep-paths) go
    into the run record only, never to Prefect."""
    logger = get_run_logger()
    totals = report.totals(results)
    logger.info("run finished: %s", ", ".join(f"{k} {v}" for k, v in totals.items()))
    for line in report.problems(results):
        logger.error(line)
    for line in report.qc_flagged(results):
        logger.warning(line)
    if results:
        description = ", ".join(f"{v} {k}" for k, v in totals.items())
        create_table_artifact([r.row() for r in results], key=TABLE_KEY, description=description)
    results = report.with_paths(results, paths)
    report.write_record(out, results)
    return results


def _is_top_level() -> bool:
    ctx = FlowRunContext.get()
    return ctx is None or ctx.flow_run is None or ctx.flow_run.parent_task_run_id is None


def results(state: State) -> list[ImageResult]:
    """A collection run's results from its final state, Completed or Failed; a run that
    could not go on (bad input list, no cluster) raises its error."""
    value = outcome(state)
    if isinstance(value, BaseException):
        raise value
    if not isinstance(value, list):
        raise RuntimeError(f"segment-collection ended {state.name}: {state.message}")
    return value
