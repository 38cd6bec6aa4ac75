"""Output stores as the field's readers see them: the ome-zarr-models validator (OME-NGFF 0.5)
and ome-zarr-py's reader (what napari-ome-zarr builds its layers from) on stores the
pipeline wrote for an X-ray, an RGB slide (whole and with a bounded picture) and a
multi-class model; the chunk bound at full resolution; stores of the older format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Node, Reader
from ome_zarr_models.v05.image import Image as NgffImage
from PIL import Image as PILImage

from pipeline import stages
from pipeline.cards import ModelCard
from pipeline.config import RunConfig
from pipeline.display import apply_window, class_colour, display_window
from pipeline.engine.tiling import MAX_FULL_CHUNK, Box, plan_tiles
from pipeline.io import open_image, preview, resize
from pipeline.local import segment
from pipeline.models import build_model, checkpoint
from pipeline.store import OutputStore, StoreError
from pipeline.store import layout as store_layout
from tests.io_fixtures import dicom_dataset, write_dicom, xray_pixels

RUN = {"precision": "fp32", "exports": (), "tile": 128}


def _model(path: Path, in_channels: int, classes: int = 1, **card) -> str:
    torch.manual_seed(0)
    model = build_model("unet", in_channels=in_channels, classes=classes, filters=[4, 8, 16])
    checkpoint.save(model, ModelCard(arch="", config={}, **card), path)
    return str(path)


def _nodes(path: Path | str) -> list[Node]:
    """The nodes with pixels that ome-zarr-py's reader finds from ``path``."""
    return [n for n in Reader(parse_url(str(path)))() if n.data]


def _scale0(node: Node) -> list[float]:
    (scale,) = [t["scale"] for t in node.metadata["coordinateTransformations"][0] if t["type"] == "scale"]
    return scale


def check_store(path: Path, px: float, first_level: int = 0) -> tuple[Node, Node, Node]:
    """What every store must give the field's readers; returns (picture, mask, prob) nodes.

    ``px``: µm per full-resolution pixel (1.0 unitless); ``first_level``: the picture's
    finest level (0 unless the input is larger than the picture's bound)."""
    NgffImage.from_zarr(zarr.open_group(path, mode="r"))  # the validator: raises if invalid
    picture, mask = _nodes(path)
    assert not picture.load(Label) and mask.load(Label)
    assert mask.zarr.parts()[-2:] == ["labels", "mask"]
    # the levels match: as many, each of the same (y, x) shape, at the same scale
    assert [d.shape[1:] for d in picture.data] == [d.shape for d in mask.data]
    assert [t[0]["scale"][1:] for t in picture.metadata["coordinateTransformations"]] == [
        t[0]["scale"] for t in mask.metadata["coordinateTransformations"]
    ]
    level = 2.0**first_level
    assert _scale0(picture) == [1.0, level * px, level * px] and _scale0(mask) == [level * px] * 2
    store = OutputStore.open(path)
    assert mask.data[0].shape == store.layout.levels[first_level]
    assert picture.data[0].dtype == np.uint8 and picture.data[0].shape[0] in (1, 3)
    # the mask's colours: the display palette, background transparent, one name per value
    label = mask.metadata
    classes = store.layout.classes
    assert label["color"] == {0: [0, 0, 0, 0], **{i: [*(v / 255 for v in class_colour(i)), 1.0]
                                                  for i in range(1, len(classes) + 1)}}  # fmt: skip
    assert label["properties"] == {0: {"class": "background"},
                                   **{i: {"class": n} for i, n in enumerate(classes, start=1)}}  # fmt: skip
    # the probabilities: an image of their own, one channel per class, coloured like it
    (prob,) = _nodes(path / "prob")
    assert [a["type"] for a in prob.metadata["axes"]] == ["channel", "space", "space"]
    assert prob.metadata["channel_names"] == list(classes)
    assert prob.metadata["colormap"] == [[[0, 0, 0], [v / 255 for v in class_colour(i)]]
                                         for i in range(1, len(classes) + 1)]  # fmt: skip
    assert prob.data[0].shape == (len(classes), *store.layout.work_hw)
    sy, sx = store.layout.scale  # at the working level's scale, centred as delivery maps it
    assert prob.metadata["coordinateTransformations"][0] == [
        {"type": "scale", "scale": [1.0, sy * px, sx * px]},
        {"type": "translation", "translation": [0.0, (sy - 1) / 2 * px, (sx - 1) / 2 * px]},
    ]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(prob.data[0]), 0, -1),
                                  np.rint(store.read_prob() * 255).astype(np.uint8))  # fmt: skip
    return picture, mask, prob


def test_xray_store_validates_with_the_full_input_as_its_picture(tmp_path):
    """A 12-bit DICOM X-ray through a model at half its size: the picture is the input at
    full resolution (windowed as the preview is), level for level under the mask."""
    pixels = xray_pixels(300, 260, bits=12)
    dcm = write_dicom(tmp_path / "cxr.dcm", dicom_dataset(pixels, bits_stored=12))
    model = _model(tmp_path / "m.safetensors", 1, scale={"size": [150, 130]})
    path = segment(dcm, model, tmp_path / "out", **RUN)
    picture, mask, _ = check_store(path, px=1.0)
    assert [d.shape for d in mask.data] == [(300, 260)]
    with open_image(dcm) as image:
        expected = apply_window(image.read_region(0, 0, 0, 300, 260), display_window(preview(image)))
    np.testing.assert_array_equal(np.asarray(picture.data[0]), np.moveaxis(expected, -1, 0))
    assert picture.metadata["name"] == OutputStore.open(path).image_id  # no patient name


def _write_pyramid(path: Path, level0: np.ndarray, mpp: float, factors: tuple[int, ...]) -> list[np.ndarray]:
    levels = [level0[::f, ::f] for f in factors]
    options = {"tile": (128, 128), "compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1,
                  metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **options)  # fmt: skip
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    return levels


def _tissue(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([128 + 100 * np.sin(yy / 40), 128 + 100 * np.cos(xx / 50),
                     (yy + xx) // 8 % 256], axis=2).astype(np.uint8)  # fmt: skip


def test_rgb_slide_store_validates_in_micrometres_with_its_colours(tmp_path):
    levels = _write_pyramid(tmp_path / "s.ome.tif", _tissue(1500, 1100), 0.5, (1, 2))
    model = _model(tmp_path / "m.safetensors", 3, scale={"mpp": 1.0})
    path = segment(tmp_path / "s.ome.tif", model, tmp_path / "out", tissue=False, **RUN)
    picture, mask, _ = check_store(path, px=0.5)
    assert [d.shape for d in mask.data] == [(1500, 1100), (750, 550)]
    assert picture.metadata["channel_names"] == ["red", "green", "blue"]
    assert all(a.get("unit") == "micrometer" for a in picture.metadata["axes"][1:])
    np.testing.assert_array_equal(np.moveaxis(np.asarray(picture.data[0]), 0, -1), levels[0])
    np.testing.assert_array_equal(np.asarray(mask.data[1]), np.asarray(mask.data[0])[::2, ::2])


def test_a_large_slide_has_a_bounded_picture_and_labels_at_its_levels(tmp_path, monkeypatch):
    """A slide larger than the picture's bound (lowered here from 8192 to 1024): the picture
    starts at the first level that small (2600 -> 1300 -> 650), resampled from the slide's
    nearest larger level; NGFF lists the mask's same levels; the full-resolution mask is
    still level 0 of the store."""
    monkeypatch.setattr(store_layout, "PICTURE_MAX_SIDE", 1024)
    levels = _write_pyramid(tmp_path / "s.ome.tif", _tissue(2600, 2200), 0.5, (1, 3))
    model = _model(tmp_path / "m.safetensors", 3, scale={"mpp": 2.0})
    path = segment(tmp_path / "s.ome.tif", model, tmp_path / "out", tissue=False, **RUN)
    picture, mask, _ = check_store(path, px=0.5, first_level=2)
    assert [d.shape for d in mask.data] == [(650, 550)]
    assert [d["path"] for d in zarr.open_group(path / "labels/mask").attrs["ome"]["multiscales"][0]["datasets"]] == ["2"]
    store = OutputStore.open(path)
    assert store.mask.shape == (2600, 2200)
    np.testing.assert_array_equal(np.asarray(mask.data[0]), store.mask[::4, ::4])
    expected = np.clip(np.rint(resize(levels[1].astype(np.float32), (650, 550))), 0, 255)
    got = np.moveaxis(np.asarray(picture.data[0]), 0, -1).astype(np.float32)
    assert np.abs(got - expected).max() <= 1  # float rounding of the same resampling


def test_multi_class_store_names_and_colours_every_class(tmp_path):
    grey = _tissue(200, 180)[..., 0]
    PILImage.fromarray(grey).save(tmp_path / "cxr.png")
    model = _model(tmp_path / "m.safetensors", 1, classes=3, class_names=["left lung", "right lung"])
    path = segment(tmp_path / "cxr.png", model, tmp_path / "out", **RUN)
    picture, mask, prob = check_store(path, px=1.0)
    assert picture.metadata["channel_names"] == ["grey"] and picture.data[0].shape == (1, 200, 180)
    np.testing.assert_array_equal(np.asarray(picture.data[0])[0], grey)
    assert prob.data[0].shape[0] == 2 and set(np.unique(np.asarray(mask.data[0]))) <= {0, 1, 2}


def test_a_model_scale_that_made_16384_chunks_makes_2048_chunks_with_one_owner(tmp_path):
    """A 256² model with a 1024 tile on a 4096² X-ray: tile * scale is 16384 (a 256 MiB
    chunk); the mask's chunks are 2048² and the one tile owns all four. Each mask chunk is
    written once (a second writer would lose pixels)."""
    PILImage.fromarray(np.zeros((4096, 4096), np.uint8)).save(tmp_path / "big.png")
    model = _model(tmp_path / "m.safetensors", 1, scale={"size": [256, 256]})
    job = stages.ingest(str(tmp_path / "big.png"), model, RunConfig(tile=1024), str(tmp_path / "out"))
    store = OutputStore.open(job.store_path)
    assert store.layout.full_chunk == MAX_FULL_CHUNK == 2048 and store.mask.chunks == (2048, 2048)
    (tile,) = plan_tiles(store.layout.work_hw, 1024)
    assert store.owned_boxes(tile)[1] == Box(0, 0, 4096, 4096)  # 2 x 2 chunks, all its own
    NgffImage.from_zarr(zarr.open_group(job.store_path, mode="r"))


# -- stores of the older format ---------------------------------------------------------


def _format_1(path: Path, work_hw=(60, 50), full_hw=(120, 100), tile=16) -> np.ndarray:
    """A store as format 1 wrote it: prob (h, w, C) at "prob", mask levels, complete."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    prob = (np.arange(np.prod(work_hw)).reshape(*work_hw, 1) % 256).astype(np.uint8)
    group.create_array("prob", data=prob, chunks=(tile, tile, 1), dimension_names=("y", "x", "c"))
    group.create_array("labels/mask/0", data=np.ones(full_hw, np.uint8), chunks=(32, 32))
    grid = (-(-work_hw[0] // tile), -(-work_hw[1] // tile))
    group.create_array("status", data=np.ones(grid, np.uint8))
    group.create_array("tile_seconds", data=np.zeros(grid, np.float32))
    layout = {"image_id": "old", "full_hw": list(full_hw), "work_hw": list(work_hw), "tile": tile,
              "full_chunk": 32, "classes": ["lung"], "prob_dtype": "uint8", "mpp": None}  # fmt: skip
    group.attrs["segpipe"] = {"format": 1, "state": "complete", "layout": layout, "provenance": {}}
    return prob


def test_a_format_1_store_is_read_but_never_written(tmp_path):
    prob = _format_1(tmp_path / "old.zarr")
    store = OutputStore.open(tmp_path / "old.zarr")
    assert store.outdated and store.state == "complete" and store.counts()["done"] == 16
    np.testing.assert_array_equal(store.read_prob(), prob / np.float32(255))
    assert list(store.checked_arrays()) == ["prob", "labels/mask/0"]
    writer = OutputStore.open(tmp_path / "old.zarr", mode="r+")
    with pytest.raises(StoreError, match="store format 1 is read only; run the image again"):
        writer.finalize()


def test_a_run_makes_a_format_1_output_again_in_the_current_format(tmp_path):
    PILImage.fromarray(_tissue(120, 100)[..., 0]).save(tmp_path / "x.png")
    model = _model(tmp_path / "m.safetensors", 1)
    first = segment(tmp_path / "x.png", model, tmp_path / "out", **RUN)
    stored = dict(zarr.open_group(first, mode="r").attrs["segpipe"])
    _format_1(first, work_hw=(120, 100))  # the same output, as format 1 left it
    zarr.open_group(first, mode="r+").attrs["segpipe"] = {**stored, "format": 1}
    again = segment(tmp_path / "x.png", model, tmp_path / "out", **RUN)
    assert again == first
    store = OutputStore.open(again)
    assert not store.outdated and store.state == "complete"
    check_store(again, px=1.0)
