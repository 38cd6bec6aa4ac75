"""OME-NGFF metadata of an output store (pure): the ``multiscales`` of an image or label
pyramid and the ``image-label`` of the mask. NGFF 0.5 is the version defined on zarr v3:
0.4's multiscales / labels metadata under an ``ome`` attribute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.display import class_colour

NGFF_VERSION = "0.5"


def ngff_multiscales(
    name: str, mpp: float | None, scales: Sequence[tuple[float, float]]
) -> list[dict[str, Any]]:
    """NGFF ``multiscales``: axes y, x (micrometre when mpp is known), one scale per level.

    ``scales`` are full-resolution pixels per level pixel; times mpp they are micrometres.
    """
    unit = {"unit": "micrometer"} if mpp else {}
    px = mpp or 1.0
    return [
        {
            "name": name,
            "axes": [{"name": a, "type": "space", **unit} for a in ("y", "x")],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [sy * px, sx * px]}
                    ],
                }
                for k, (sy, sx) in enumerate(scales)
            ],
        }
    ]


def ngff_image_label(classes: Sequence[str]) -> dict[str, Any]:
    """NGFF ``image-label``: transparent background, the display palette's colour
    (pipeline.display, as in overlays) and a name per class."""
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colors += [
        {"label-value": i, "rgba": [*class_colour(i), 255]} for i in range(1, len(classes) + 1)
    ]
    properties = [{"label-value": i, "class": n} for i, n in enumerate(classes, start=1)]
    return {"colors": colors, "properties": properties, "source": {"image": "../../"}}
