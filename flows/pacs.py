"""The PACS side of a collection run (pipeline/io/dicomweb.py does the talking):

- query: a DICOMweb source's instances in the studies dated since its watermark, as
  `Source`s named by a keyed hash of their UIDs and carrying the header attributes the
  selection rules read (nothing is fetched to select);
- after the run: the watermark of each source whose images all ended complete or skipped
  moves to the day of its query (pipeline/watermark.py);
- store: a complete image's DICOM SEG sent with STOW-RS, once (what the PACS acknowledged
  is recorded beside the SEG, `<image_id>.seg.stow.json`).

Prefect sees image ids, counts and the service root only: never a UID, nor the query keys a
source was written with (Inputs hides them, as it hides paths).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import report
from flows.discover import Inputs, Source
from flows.report import ImageResult
from flows.tasks import (
    IO_BACKOFF,
    IO_JITTER,
    IO_RETRIES,
    keep_private,
    private_names,
    transient,
)
from pipeline import watermark
from pipeline.config import RunConfig
from pipeline.io import dicomweb
from pipeline.selection import keywords, parse_rules, required_values
from pipeline.store import output_key, safe_image_id

RECORD_SUFFIX = ".stow.json"  # beside <image_id>.seg.dcm: <image_id>.seg.stow.json


@dataclass(frozen=True)
class Query:
    """What one DICOMweb source's query found: its watermark key, the day it ran, the
    StudyDate range it asked for, and the instances as sources."""

    key: str
    day: date
    dates: str | None
    sources: list[Source]


@task(name="query-pacs", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF,
      retry_jitter_factor=IO_JITTER, retry_condition_fn=transient, cache_policy=NO_CACHE)
def query_task(source: Inputs, out: str, rules: tuple[str, ...], config: RunConfig) -> Query:
    """The instances of one DICOMweb source (QIDO-RS, WADO-RS metadata) since its watermark."""
    found = query(source.items[0], out, rules, config)
    get_run_logger().info("%s: %d instances in studies dated %s", dicomweb.Endpoint.parse(source.items[0]).root,
                          len(found.sources), found.dates or "any day")  # fmt: skip
    return found


def query(text: str, out: str, rules: tuple[str, ...], config: RunConfig, today: date | None = None) -> Query:
    """The DICOMweb source `text`'s instances: in studies dated from its watermark (minus
    the lookback) on, of the modalities the rules require (asked of the PACS), each with
    the attributes the rules read."""
    endpoint = dicomweb.Endpoint.parse(text)
    key = output_key(out)
    mark = watermark.source_key(key, endpoint.text)
    through = watermark.read(out).get(mark) if config.watermark else None
    dates = watermark.study_window(dict(endpoint.filters).get("StudyDate"), through, config.lookback_days)
    parsed = parse_rules(rules)
    day = today or date.today()  # before the query: what arrives during it is asked for again
    found = dicomweb.search(endpoint, dates, required_values(parsed, "Modality"), keywords(parsed))
    sources = {(s := Source(endpoint.instance_uri(i), safe_image_id(i.identity, key), i.header)).image_id: s
               for i in found}  # fmt: skip
    return Query(mark, day, dates, sorted(sources.values(), key=lambda s: s.image_id))


def advance_watermarks(out: str, queries: Sequence[Query], results: Sequence[ImageResult]) -> None:
    """Move the watermark of each source whose images all ended complete or skipped (a
    source that found nothing too) to the day of its query; the others stay, so the next
    run asks for the same days again."""
    done = {r.image_id for r in results if r.ok}
    watermark.advance(out, {q.key: q.day for q in queries if all(s.image_id in done for s in q.sources)})


@task(name="store-seg", retries=IO_RETRIES, retry_delay_seconds=IO_BACKOFF,
      retry_jitter_factor=IO_JITTER, retry_condition_fn=transient, cache_policy=NO_CACHE)
def store_task(seg: str, source: Source, config: RunConfig) -> bool:
    """Send the image's DICOM SEG to the run's STOW-RS endpoint unless it acknowledged
    these bytes before; True when sent now."""
    with keep_private(private_names(source)):
        sent = dicomweb.store_once(destination(config.store, source), seg, record_of(seg))
    get_run_logger().info("%s: DICOM SEG %s", source.image_id, "stored" if sent else "already stored")
    return sent


def destination(store: str | None, source: Source) -> dicomweb.Endpoint:
    """Where --store sends: `dicomweb` is the PACS the image came from."""
    if store == "dicomweb":
        if not dicomweb.is_dicomweb(source.uri):
            raise dicomweb.PacsError(f"{source.image_id}: --store dicomweb sends a SEG back to the DICOMweb "
                                     "source of its image, and this one is a file: give --store dicomweb+https://host/path")  # fmt: skip
        return dicomweb.split_instance(source.uri)[0]
    return dicomweb.Endpoint.parse(str(store))


def record_of(seg: str) -> str:
    """Where what the PACS acknowledged of the SEG `seg` is recorded."""
    return f"{seg.removesuffix('.dcm')}{RECORD_SUFFIX}"


def stored(results: Sequence[ImageResult], sources: Mapping[str, Source], config: RunConfig) -> list[ImageResult]:
    """`results` once their SEGs are stored (--store): each complete image's SEG that its
    PACS has not acknowledged as it is is sent (store tasks, all at once); `stored` says
    sent now or before. A send that failed makes a failed result naming the image (its
    output stays complete: the next run sends it)."""
    if not config.store:
        return list(results)
    done, sending = {}, {}
    for result in results:
        seg = result.exports.get("dicom-seg")
        if result.state != "complete" or not seg:
            continue
        source = sources[result.image_id]
        try:
            before = dicomweb.acknowledged(destination(config.store, source), seg, record_of(seg))
        except (dicomweb.PacsError, OSError) as exc:
            done[result.image_id] = _not_stored(result, exc)
            continue
        if before:
            done[result.image_id] = replace(result, stored="stored before")
        else:
            sending[result.image_id] = store_task.submit(seg, source, config)
    for image_id, future in sending.items():
        result = next(r for r in results if r.image_id == image_id)
        sent = future.result(raise_on_failure=False)
        done[image_id] = _not_stored(result, sent) if isinstance(sent, BaseException) else replace(result, stored="sent")
    return [done.get(r.image_id, r) for r in results]


def _not_stored(result: ImageResult, exc: BaseException) -> ImageResult:
    error = dicomweb.PacsError(f"{result.image_id}: DICOM SEG not stored: {' '.join(str(exc).split())}")
    get_run_logger().error(str(error))
    failed = report.failed(result.image_id, error)
    return replace(failed, output=result.output, exports=result.exports, size=result.size, counts=result.counts)
