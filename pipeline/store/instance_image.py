"""The instance label image of an output store (labels/<name>), made by finalize from the
tiles' instance keys (instances/<name>, pipeline.instances). Driver side.

One pass over the keys, tile chunk by tile chunk, collects the sorted keys; a second pass
writes each full-resolution chunk of labels/<name>/0: the nearest working-level key of
each pixel (pixel centres, as the mask is delivered), mapped to its id 1..n by rank, kept
where the mask is foreground. Memory: the sorted keys (one uint32 per instance) and a
chunk, whatever the image's size (invariant 3). Redone whole at every finalize, so a
resumed run's new tiles are taken in and finalizing twice gives the same ids.
"""

from __future__ import annotations

import numpy as np
import zarr

from pipeline import instances
from pipeline.store.layout import StoreLayout


def write_ids(keys: zarr.Array, mask: zarr.Array, target: zarr.Array, layout: StoreLayout) -> int:
    """Write labels/<name>/0 (`target`) from the working-level `keys` and the full-res
    `mask`; returns the number of instances."""
    t, (wh, ww) = layout.tile, layout.work_hw
    found = instances.unique_keys(np.asarray(keys[y : y + t, x : x + t])
                                  for y in range(0, wh, t) for x in range(0, ww, t))  # fmt: skip
    (fh, fw), chunk = layout.full_hw, layout.full_chunk
    for y in range(0, fh, chunk):
        for x in range(0, fw, chunk):
            ys = instances.nearest_index(y, min(y + chunk, fh), wh, fh)
            xs = instances.nearest_index(x, min(x + chunk, fw), ww, fw)
            near = np.asarray(keys[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1])[np.ix_(ys - ys[0], xs - xs[0])]
            box = np.s_[y : y + len(ys), x : x + len(xs)]
            target[box] = np.where(np.asarray(mask[box]) > 0, instances.compact_ids(near, found), 0)
    return int(len(found))
