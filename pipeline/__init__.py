"""segpipe: batch segmentation of very large medical images.

`pipeline.segment(input, model, out, **config)` runs one image in this process.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import pipeline.errors` does not pull in torch, zarr and dask.
    if name == "segment":
        from pipeline.local import segment

        return segment
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
