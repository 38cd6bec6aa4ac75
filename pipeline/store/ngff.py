"""OME-NGFF metadata of an output store (pure): the ``multiscales`` of an image or label
pyramid, the ``image-label`` of the mask and the ``omero`` rendering of the picture and of
the probabilities. NGFF 0.5 is the version defined on zarr v3: 0.4's multiscales / labels
metadata under an ``ome`` attribute.

What the field's readers need, and where each rule comes from:
- a channel axis precedes the space axes (NGFF; the ome-zarr-models validator checks it);
- a label image's ``colors`` and ``properties`` list the same label values (the validator
  refuses a store otherwise): background has a property too;
- ``omero`` channels (colour, window) are how napari-ome-zarr and ome-zarr-py colour an
  image's channels: R, G and B blended additively show the input in its colours, and each
  class's probability shows as a black-to-class-colour heat map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.display import RGB, class_colour

NGFF_VERSION = "0.5"

RGB_CHANNELS: tuple[tuple[str, RGB], ...] = (
    ("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255)),
)  # fmt: skip
GREY_CHANNEL: tuple[tuple[str, RGB], ...] = (("grey", (255, 255, 255)),)


def ngff_multiscales(
    name: str,
    mpp: float | None,
    scales: Sequence[tuple[float, float]],
    *,
    paths: Sequence[str] | None = None,
    channel: bool = False,
    translations: Sequence[tuple[float, float]] | None = None,
) -> list[dict[str, Any]]:
    """NGFF ``multiscales``: axes (c,) y, x (micrometre when mpp is known), one dataset per
    level at ``paths`` (default "0", "1", ...).

    ``scales`` and ``translations`` are in full-resolution pixels (a level pixel's size and
    its first pixel's centre); times mpp they are micrometres. A channel axis has scale 1.
    """
    unit = {"unit": "micrometer"} if mpp else {}
    px = mpp or 1.0
    axes = [{"name": a, "type": "space", **unit} for a in ("y", "x")]
    lead: list[float] = []
    if channel:
        axes.insert(0, {"name": "c", "type": "channel"})
        lead = [1.0]
    paths = [str(k) for k in range(len(scales))] if paths is None else list(paths)
    datasets = []
    for k, (sy, sx) in enumerate(scales):
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [*lead, sy * px, sx * px]}]
        if translations is not None:
            ty, tx = translations[k]
            shift = [*(0.0 for _ in lead), ty * px, tx * px]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": paths[k], "coordinateTransformations": transforms})
    return [{"name": name, "axes": axes, "datasets": datasets}]


def ngff_image_label(classes: Sequence[str]) -> dict[str, Any]:
    """NGFF ``image-label``: transparent background, the display palette's colour
    (pipeline.display, as in overlays) and a name per class; every label value listed in
    ``colors`` has its ``properties`` entry, background included."""
    colors = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]
    colors += [
        {"label-value": i, "rgba": [*class_colour(i), 255]} for i in range(1, len(classes) + 1)
    ]
    properties = [{"label-value": 0, "class": "background"}]
    properties += [{"label-value": i, "class": n} for i, n in enumerate(classes, start=1)]
    return {"version": NGFF_VERSION, "colors": colors, "properties": properties,
            "source": {"image": "../../"}}  # fmt: skip


def ngff_instance_label() -> dict[str, Any]:
    """NGFF ``image-label`` of an instance image: ids are many and image-specific, so no
    palette (viewers colour labels themselves); background transparent and named."""
    return {"version": NGFF_VERSION, "colors": [{"label-value": 0, "rgba": [0, 0, 0, 0]}],
            "properties": [{"label-value": 0, "class": "background"}],
            "source": {"image": "../../"}}  # fmt: skip


def ngff_omero(channels: Sequence[tuple[str, RGB]], window: tuple[float, float]) -> dict[str, Any]:
    """``omero`` rendering: each channel's name, colour and display window, all shown."""
    low, high = window
    return {
        "channels": [
            {"label": name, "color": "".join(f"{v:02X}" for v in rgb), "active": True,
             "window": {"min": low, "max": high, "start": low, "end": high}}
            for name, rgb in channels
        ],
        "rdefs": {"model": "color"},
    }  # fmt: skip


def class_channels(classes: Sequence[str]) -> list[tuple[str, RGB]]:
    """The probability image's channels: one per class, in its palette colour."""
    return [(name, class_colour(i)) for i, name in enumerate(classes, start=1)]
