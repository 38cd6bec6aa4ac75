"""The per-image stages a run goes through: ingest → plan → infer → finalize → export.

Each stage takes paths, ids and the RunConfig and returns small summaries, never pixels:
Prefect tasks call them one to one, and `pipeline.segment` chains them in one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import zarr

from pipeline import __version__, cards, instances, postprocess
from pipeline.cards import ModelCard, ModelId
from pipeline.config import RunConfig
from pipeline.display import apply_window, as_rgb, display_window
from pipeline.engine.normalization import image_stats
from pipeline.engine.tiling import (
    effective_halo,
    full_res_chunk,
    plan_tiles,
    work_shape_for,
)
from pipeline.errors import InputError
from pipeline.io import (
    Image,
    dicomweb,
    location,
    open_image,
    picture_source,
    preview,
)
from pipeline.io import ingest as ingest_level
from pipeline.io.levels import assume_mpp, working_level
from pipeline.job import ImageJob, TileReport, TileStatus
from pipeline.limits import check_planned_work, reads_in_place
from pipeline.store import (
    OutputStore,
    StoreError,
    output_key,
    safe_image_id,
    store_path,
    verify_store,
)

if TYPE_CHECKING:
    from pipeline.engine.pool import RunPool
    from pipeline.engine.scheduler import Progress
    from pipeline.io.exports import ExportInput

log = logging.getLogger(__name__)

DEFAULT_HALO = 64


def ingest(input_path: str, model_path: str, config: RunConfig, out_root: str,
           image_id: str | None = None, fetched_from: str | None = None) -> ImageJob:
    """Open the image, fix its geometry, create (or reopen) its output store, bring its
    working level into zarr (or read it in place) and store a preview. An image whose
    planned work exceeds the run's limits is refused before anything is written
    (limits.check_planned_work).

    `fetched_from`: the remote URL that `input_path` is this machine's copy of. Provenance
    records the URL, and the working level always goes into the store (`<store>/work`):
    tile workers on other nodes cannot read this machine's copy in place."""
    card = cards.read_card(model_path)
    in_place = fetched_from is None
    with _open(input_path, config) as image:
        mpp_from = assume_mpp(image, config.mpp)
        level, full_hw, work_hw = working_geometry(image, card)
        check_planned_work(image, level, work_hw, card, config, in_place)
        if card.instances:  # refused here, not tile by tile: ids are uint32 keys
            try:
                instances.check_key_space(work_hw)
            except ValueError as exc:
                raise InputError(f"{input_path}: {exc}") from None
        _check_channels(image, card, config)
        _check_modality(image, card, config)
        # only now, once the image is accepted: a refused one leaves nothing behind, not
        # even the output root's id key
        image_id = image_id or safe_image_id(fetched_from or input_path, output_key(out_root))
        path = store_path(out_root, image_id)
        store = OutputStore.create_or_open(
            path, image_id=image_id, full_hw=full_hw, work_hw=work_hw, tile=config.tile,
            full_chunk=full_res_chunk(config.tile, (full_hw[0] / work_hw[0], full_hw[1] / work_hw[1])),
            classes=card.class_names, prob_dtype=config.prob_dtype, mpp=image.mpp,
            instances=(card.instances["name"],) if card.instances else (),
            provenance=_provenance(input_path, image, model_path, card, config, level, fetched_from,
                                   mpp_from),
            overwrite=config.overwrite,
        )  # fmt: skip
        work_url = _working_level(image, level, work_hw, path, config.tile, in_place)
        overview = preview(image)
        # measured once (percentiles of a 12-bit preview are most of its cost): the
        # preview's window is the picture's too, so both look alike
        window = display_window(overview)
        if not store.has_preview():
            store.write_preview(apply_window(overview, window))
        if not store.has_picture():
            lay = store.layout
            store.write_picture(picture_source(image, lay.levels[lay.picture_from]), window)
        multiple = card.multiple
        halo = config.halo if config.halo is not None else (card.halo or DEFAULT_HALO)
        return ImageJob(
            image_id=image_id, input_path=str(input_path), store_path=path,
            full_hw=full_hw, work_hw=work_hw, tile=config.tile,
            halo=effective_halo(halo, multiple), kind=image.kind,
            norm_stats=image_stats(overview, card.normalization, card.in_channels),
            work_url=work_url, source_level=level,
        )  # fmt: skip


def plan(job: ImageJob, config: RunConfig, store: OutputStore | None = None) -> dict[str, int]:
    """Mark background tiles SKIPPED (slides by default, or with a user mask); only tiles
    still PENDING are touched, so a resumed run keeps what it had. `store`: the image's
    store already open (r+) in this process (plan, infer and finalize may share one)."""
    store = store or OutputStore.open(job.store_path, mode="r+")
    use_tissue = config.tissue if config.tissue is not None else job.kind == "slide"
    if not (use_tissue or config.tissue_mask):
        return store.counts()
    from pipeline.engine import tissue

    if config.tissue_mask:
        with _open(config.tissue_mask, config) as mask_image:
            mask = preview(mask_image)[..., 0] > 0
    else:
        mask = tissue.tissue_mask(as_rgb(store.preview()))
    tiles = plan_tiles(job.work_hw, job.tile)
    fractions = tissue.tile_tissue_fraction(mask, tiles, job.work_hw)
    skipped = tissue.skipped_tiles(fractions, config.tissue_threshold)
    grid = store.status_grid()
    reports = [TileReport(i, TileStatus.SKIPPED) for i in skipped if grid[i] == TileStatus.PENDING]
    if reports:
        store.set_many(reports)
    return store.counts()


def infer(job: ImageJob, config: RunConfig, pool: RunPool, progress: Progress | None = None,
          store: OutputStore | None = None) -> dict[str, int]:  # fmt: skip
    """Run the image's pending and failed tiles on a lease of the run's worker pool and
    wait; returns the image's tile counts. An image already complete is not touched, and
    the pool is not leased for it (so a run with nothing to compute starts no worker)."""
    from pipeline.engine.scheduler import run_tiles

    store = store or OutputStore.open(job.store_path, mode="r+")
    if store.state == "complete":
        return store.counts()
    todo = store.tiles_to_run(plan_tiles(job.work_hw, job.tile))
    if not todo:
        return store.counts()
    store.mark_state("running")
    log.info("%s: %d of %d tiles to run", job.image_id, len(todo), store.counts()["total"])
    start = time.perf_counter()
    with pool.lease() as backend:
        counts = run_tiles(job, todo, backend, store, config.retries, progress)
    store.update_provenance("timings", {"infer_s": round(time.perf_counter() - start, 3)})
    return counts


def finalize(job: ImageJob, store: OutputStore | None = None) -> dict[str, Any]:
    """Build the mask pyramid, record each chunk's checksum and write the completion
    state, last; then the QC verdict of a complete image (`store.qc.record_qc`). A store
    already complete (infer left it alone) is verified instead, never re-recorded: that
    would bless damage found since as the truth. A damaged one is set to be repaired by
    the next run, and its summary says partial."""
    from pipeline.store import schedule_repair, verify_store
    from pipeline.store.qc import record_qc

    store = store or OutputStore.open(job.store_path, mode="r+")
    if store.state != "complete":
        if store.finalize() == "complete":
            record_qc(store)
        return store.summary()
    verdict = verify_store(store, full=False)
    if verdict.ok and verdict.moved:  # copied or restored, same bytes: refresh the markers
        store.record_checksums()
    elif not verdict.ok:
        tiles = schedule_repair(store, verdict)
        log.warning("%s; %d tiles run again on the next run", verdict.summary(), len(tiles))
    if verdict.ok and "qc" not in store.provenance:  # completed before QC verdicts existed
        record_qc(store)
    return store.summary()


def working_geometry(image: Image, card: ModelCard) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(source level, full-resolution (h, w), working (h, w)) for this image and model."""
    full_hw = tuple(image.levels[0][:2])
    scale = card.scale or {}
    if "size" in scale:
        return 0, full_hw, work_shape_for(full_hw, tuple(scale["size"]))
    if "mpp" in scale:
        if image.mpp is None:
            log.warning("%s: no pixel size in the file and no --mpp; running at its own scale, "
                        "not the model's %s um/px", image.path, scale["mpp"])
            return 0, full_hw, full_hw
        chosen = working_level(image, float(scale["mpp"]))  # the rule training uses too
        return chosen.level, full_hw, chosen.hw
    return 0, full_hw, full_hw


def _check_channels(image: Image, card: ModelCard, config: RunConfig) -> None:
    """A grey image through a colour model is refused unless asked for: repeated into R, G
    and B it is not what the model learnt (a greyscale slide through tissue-he scored IoU
    0.13 against 0.953 in colour). Alpha is dropped everywhere (io.to_channels)."""
    colour = image.levels[0][2] in (3, 4)
    if card.in_channels == 3 and not colour and not config.allow_grey:
        model = f"the model {card.name}" if card.name else "the model"
        raise InputError(f"{image.path}: a grey image, and {model} expects colour (RGB); run with "
                         "--allow-grey to repeat grey into R, G and B")  # fmt: skip


def _check_modality(image: Image, card: ModelCard, config: RunConfig) -> None:
    """A DICOM whose Modality the card does not list is refused unless asked for. A DICOM
    without the (type 1) attribute goes on: nothing says it is of another kind."""
    modality = str(image.metadata_safe().get("modality", "")).strip().upper()
    if card.modalities and modality and modality not in card.modalities and not config.allow_modality:
        model = f"the model {card.name}" if card.name else "the model"
        raise InputError(f"{image.path}: a DICOM of modality {modality}, and {model} takes "
                         f"{', '.join(card.modalities)}; run with --allow-modality to segment it anyway")  # fmt: skip


def _open(path: str, config: RunConfig) -> Image:
    return open_image(path, max_pixels=config.max_pixels, max_slide_pixels=config.max_slide_pixels)


def _working_level(image: Image, level: int, work_hw: tuple[int, int], path: str, chunk: int,
                   in_place: bool = True) -> str | None:  # fmt: skip
    """None when the source level is read in place (allowed by `in_place`, possible for a
    tile-addressable level at the model's scale); else the ingested zarr array's URL."""
    if reads_in_place(image, level, work_hw, in_place):
        return None
    url = f"{path}/work"
    try:
        done = zarr.open_array(url, mode="r").attrs.get("ingested") is True
    except (FileNotFoundError, zarr.errors.NodeNotFoundError, KeyError):
        done = False
    if not done:
        array = ingest_level(image, level, url, work_shape=work_hw, chunk=chunk)
        array.attrs["ingested"] = True
    return url


def _content_hash(input_path: str) -> str:
    """The input's content hash (`location.content_hash`); a DICOMweb slide series is read,
    never fetched whole, so its UIDs stand for its content (`dicomweb.series_hash`)."""
    return dicomweb.series_hash(input_path) if dicomweb.is_slide_series(input_path) else location.content_hash(input_path)


def _provenance(input_path: str, image: Image, model_path: str, card: ModelCard,
                config: RunConfig, level: int, fetched_from: str | None,
                mpp_from: str | None = None) -> dict[str, Any]:  # fmt: skip
    """What the store records of its making. The input's path only with `keep_paths`
    (invariant 8: file and folder names may name the patient)."""
    where = {"path": fetched_from or str(input_path)} if config.keep_paths else {}
    return {
        "input": {**where, "sha256": _content_hash(input_path),
                  "image": image.metadata_safe(), "level": level, "mpp_from": mpp_from},
        "postprocess": postprocess.provenance_record(card.postprocess, config.postprocess),
        "model": {"path": str(model_path), "sha256": location.sha256_cached(model_path),
                  "card": card.to_dict()},
        "run": config.to_dict(),
        "versions": {"segpipe": __version__},
    }


def export(job: ImageJob, config: RunConfig, formats: tuple[str, ...] | None = None) -> dict[str, str]:
    """Write the requested exports beside the store (a local folder or any fsspec URL);
    returns format -> file location. Each format in pipeline.io.exports.EXPORTS says which
    inputs it applies to (dicom-seg: DICOM X-rays and DICOM WSI); it is skipped, with a
    warning line saying what it needs, for the others."""
    from pipeline.io.exports import EXPORTS

    store = OutputStore.open(job.store_path)
    verdict = verify_store(store)  # never export from a damaged store
    if not verdict.ok:
        raise StoreError(f"{verdict.summary()}; not exported")
    source = _export_input(job, store)
    requested = formats if formats is not None else config.exports
    planned = _export_locations(job, source, requested)
    for name in requested:
        if name not in planned:
            log.warning("%s: %s needs %s; skipped", job.image_id, name, EXPORTS[name].requires)
    for name, where in planned.items():
        EXPORTS[name].write(source, where)
    return planned


def planned_exports(job: ImageJob, formats: tuple[str, ...]) -> dict[str, str]:
    """Where `export` would write each of `formats` that applies to this image (format ->
    file location); reads only the store's metadata, no pixels. A re-run compares it with
    what exists (pipeline.io.exports.export_exists) to write only what is missing."""
    store = OutputStore.open(job.store_path)
    return _export_locations(job, _export_input(job, store), formats)


def _export_locations(job: ImageJob, source: ExportInput, formats: tuple[str, ...]) -> dict[str, str]:
    """format -> file location of each of `formats` that applies to the image."""
    from pipeline.io.exports import EXPORTS, export_location

    planned: dict[str, str] = {}
    for name in formats:
        fmt = EXPORTS.get(name)
        if fmt is None:
            raise InputError(f"{job.image_id}: unknown export {name!r}; valid: {tuple(EXPORTS)}")
        if fmt.applies(source):
            planned[name] = export_location(job.store_path, fmt.suffix)
    return planned


def _export_input(job: ImageJob, store: OutputStore) -> ExportInput:
    """The exports' view of a finished store (pipeline.io.exports.ExportInput); its mask
    levels open when a writer first reads them."""
    from pipeline.io.exports import ExportInput

    provenance = store.provenance
    recorded = provenance.get("input", {}).get("image") or {}
    return ExportInput(
        mask_levels=_MaskLevels(store), classes=store.layout.classes, mpp=store.layout.mpp,
        input_path=job.input_path, kind=job.kind, preview=store.preview,
        model=ModelId.from_provenance(provenance.get("model") or {}),
        input_format=recorded.get("format"), qc=provenance.get("qc"),
        instances=(lambda: store.instance_level(0)) if store.layout.instances else None,
    )  # fmt: skip


class _MaskLevels(Sequence[Any]):
    """A store's mask pyramid, level 0 first, each level's array opened on first use:
    deciding which exports apply (and where they go) opens none."""

    def __init__(self, store: OutputStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return len(self._store.layout.levels)

    def __getitem__(self, k: Any) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        return self._store.mask_level(range(len(self))[k])
