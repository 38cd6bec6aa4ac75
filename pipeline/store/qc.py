"""A finished store's QC verdict (pipeline.qc): its stored probabilities measured as the
run delivered them, judged against the card's ranges, and recorded in its provenance
("qc"), where status, the run table and the exports read it. Driver side.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.engine.tiling import plan_tiles
from pipeline.job import TileStatus
from pipeline.qc import QcVerdict, judge, measure_tiles, measure_whole
from pipeline.store.store import OutputStore

log = logging.getLogger(__name__)


def record_qc(store: OutputStore) -> dict[str, Any]:
    """Judge a complete store (image_qc) and record the verdict in its provenance."""
    verdict = image_qc(store).to_dict()
    store.update_provenance("qc", verdict)
    if verdict["verdict"] == "flag":
        log.warning("%s: QC flag: %s", store.image_id, "; ".join(verdict["reasons"]))
    return verdict


def image_qc(store: OutputStore) -> QcVerdict:
    """The QC verdict of a finished store, from its provenance (the card's ranges and
    post-processing, the run's threshold and settings) and its stored probabilities.
    Fixed-size models are measured whole; others tile by tile over the computed tiles."""
    provenance = store.provenance
    card = (provenance.get("model") or {}).get("card") or {}
    run = provenance.get("run") or {}
    threshold = run.get("threshold")
    threshold = float(card.get("threshold", 0.5) if threshold is None else threshold)
    classes = list(store.layout.classes)
    if "size" in (card.get("scale") or {}):
        # bounded by the card's working size (lung-xray: 256²); the store's uint8 values are
        # p rounded to 1/255: a pixel within 1/510 of the threshold may fall the other way
        spec = (card.get("postprocess") or {}) if run.get("postprocess", True) else {}
        measures = measure_whole(store.read_prob(), classes, threshold, spec)
    else:
        grid = store.status_grid()
        done = (t.region for t in plan_tiles(store.layout.work_hw, store.layout.tile)
                if grid[t.index] == TileStatus.DONE)
        h, w = store.layout.work_hw
        measures = measure_tiles((store.read_prob(box) for box in done), classes, threshold, h * w)
    return judge(measures, card.get("qc") or {})
