"""Reading an output root back: its image stores, and each store as the ImageJob the
export stage takes (for `segpipe status` and `segpipe export`, which need no Prefect)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError
from pipeline.job import ImageJob
from pipeline.store import OutputStore, StoreError


def stores(out_root: str | Path) -> list[OutputStore]:
    """Every segpipe output store directly under `out_root`, by image id."""
    root = Path(out_root)
    if not root.is_dir():
        raise InputError(f"{root}: no such output folder")
    found = []
    for path in sorted(root.glob("*.zarr")):
        try:
            found.append(OutputStore.open(path))
        except StoreError:
            continue  # another tool's zarr in the same folder
    return found


def job_for(store: OutputStore) -> ImageJob:
    """The ImageJob of an existing store, from its layout and provenance (export reads only
    the store, the input path (DICOM SEG) and the image kind)."""
    lay, source = store.layout, store.provenance.get("input", {})
    return ImageJob(
        image_id=lay.image_id, input_path=source.get("path", ""), store_path=store.path,
        full_hw=lay.full_hw, work_hw=lay.work_hw, tile=lay.tile, halo=0,
        kind=(source.get("image") or {}).get("kind", "xray"),
    )  # fmt: skip
