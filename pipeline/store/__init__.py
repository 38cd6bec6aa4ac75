"""The output store of one image (a zarr v3 group that viewers open as OME-Zarr): its
names, layout, NGFF metadata, provenance and status grid. See store.py for the layout."""

from pipeline.store.store import (
    OutputStore,
    StoreError,
    StoreLayout,
    check_provenance,
    ngff_image_label,
    ngff_multiscales,
    pyramid_shapes,
    safe_image_id,
    same_output,
    store_path,
)

__all__ = [
    "OutputStore",
    "StoreError",
    "StoreLayout",
    "check_provenance",
    "ngff_image_label",
    "ngff_multiscales",
    "pyramid_shapes",
    "safe_image_id",
    "same_output",
    "store_path",
]
