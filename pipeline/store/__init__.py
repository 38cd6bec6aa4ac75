"""The output store of one image (a zarr v3 group that viewers open as OME-Zarr).

    names.py       output names and paths (safe_image_id, store_path)
    layout.py      the on-disk layout: StoreLayout, pyramid_shapes, creating the arrays
    ngff.py        OME-NGFF metadata (multiscales, image-label, omero)
    provenance.py  identifier scrubbing, versions, same_output
    status.py      the tile status grid
    checksums.py   per-chunk digests, sizes and modification markers (recorded at finalize)
    verify.py      checking a store against them; scheduling the repair of what fails
    lock.py        one run at a time on each image's output (StoreLock)
    picture.py     the input's picture: the NGFF image at the group's root, in colour
    pyramid.py     pyramid levels from the level above (nearest for labels, means else)
    store.py       OutputStore: opening, metadata, pixels, tile status, completion state
    finalize.py    what OutputStore inherits: finalize (instances, pyramids, checksums,
                   state last), damage records, summary
"""

from pipeline.store.errors import NotAStoreError, StoreError, storage_refusal
from pipeline.store.layout import StoreLayout, picture_from, pyramid_shapes
from pipeline.store.lock import POLL_S as LOCK_POLL_S
from pipeline.store.lock import StoreLock
from pipeline.store.names import output_key, safe_image_id, store_path
from pipeline.store.ngff import ngff_image_label, ngff_multiscales
from pipeline.store.provenance import check_provenance, same_output
from pipeline.store.store import OutputStore
from pipeline.store.verify import Verdict, schedule_repair, verify_store

__all__ = [
    "LOCK_POLL_S",
    "StoreLock",
    "NotAStoreError",
    "OutputStore",
    "StoreError",
    "StoreLayout",
    "Verdict",
    "check_provenance",
    "ngff_image_label",
    "ngff_multiscales",
    "pyramid_shapes",
    "output_key",
    "picture_from",
    "safe_image_id",
    "same_output",
    "schedule_repair",
    "storage_refusal",
    "store_path",
    "verify_store",
]
