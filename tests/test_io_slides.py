"""Whole-slide readers: OME-TIFF pyramids, SVS, lazy tile reads, zarr / OME-Zarr, levels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image as PILImage

from pipeline.errors import InputError
from pipeline.io import Limits, open_image, read_in_place, select_level, to_channels
from tests.io_fixtures import giant_tile_value, write_sparse_giant_tiff, write_svs_like


def _smooth_rgb(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([(yy // 2) % 256, (xx // 3) % 256, ((yy + xx) // 4) % 256], axis=2).astype(
        np.uint8
    )


def _write_ome_pyramid(
    path: Path, level0: np.ndarray, mpp: float, compression: str = "zlib"
) -> list[np.ndarray]:
    levels = [level0, level0[::2, ::2], level0[::4, ::4]]
    options = {"tile": (128, 128), "compression": compression, "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            levels[0],
            subifds=2,
            metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp},
            **options,
        )
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    return levels


@pytest.mark.parametrize("compression", ["zlib", "zstd", "lzw", "jpeg2000"])
def test_ome_tiff_pyramid_levels_mpp_and_regions(tmp_path: Path, compression: str) -> None:
    path = tmp_path / "slide.ome.tif"
    levels = _write_ome_pyramid(path, _smooth_rgb(520, 700), 0.25, compression)
    with open_image(path) as image:
        assert image.kind == "slide"
        assert image.levels == [(520, 700, 3), (260, 350, 3), (130, 175, 3)]
        assert image.mpp == pytest.approx(0.25)
        for level, expected in enumerate(levels):
            np.testing.assert_array_equal(
                image.read_region(level, 3, 5, 60, 70), expected[3:63, 5:75]
            )


def test_svs_like_tiff_skips_thumbnail_label_macro_and_parses_mpp(tmp_path: Path) -> None:
    level0 = _smooth_rgb(600, 700)
    path = write_svs_like(tmp_path / "slide.svs", level0, mpp=0.499)
    with open_image(path) as image:
        assert image.metadata_safe()["format"] == "svs"
        assert image.levels == [(600, 700, 3), (300, 350, 3)]
        assert image.mpp == pytest.approx(0.499)
        region = image.read_region(1, 40, 50, 100, 120)
    assert np.abs(region.astype(int) - level0[::2, ::2][40:140, 50:170]).mean() < 3  # JPEG tiles


def _count_gets(store) -> list[str]:
    """The keys `store` is asked for from now on (its async get, wrapped)."""
    keys: list[str] = []
    original_get = store.get

    async def counting_get(key, *args, **kwargs):
        keys.append(key)
        return await original_get(key, *args, **kwargs)

    store.get = counting_get
    return keys


def test_lazy_region_of_50k_tiff_touches_only_its_tiles(tmp_path: Path) -> None:
    path = write_sparse_giant_tiff(tmp_path / "giant.tif")
    with open_image(path) as image:
        assert image.levels == [(50_000, 50_000, 1)] and image.kind == "slide"
        store = image._stores[0].store_path.store
        requested = _count_gets(store)
        y, x = 20_000 + 100, 30_000 + 100  # a 512^2 region straddling 2x2 tiles
        region = image.read_region(0, y, x, 512, 512)
    chunk_reads = [key for key in requested if not key.endswith("zarr.json")]
    assert len(chunk_reads) == 4
    assert region.shape == (512, 512, 1)
    assert region[0, 0, 0] == giant_tile_value(y, x)
    assert region[-1, -1, 0] == giant_tile_value(y + 511, x + 511)


def test_read_in_place_is_lazy_for_tiled_and_none_for_png(tmp_path: Path) -> None:
    path = tmp_path / "slide.ome.tif"
    levels = _write_ome_pyramid(path, _smooth_rgb(300, 400), 0.5)
    with open_image(path) as image:
        lazy = read_in_place(image, 1)
        assert lazy.shape == (150, 200, 3)
        np.testing.assert_array_equal(lazy[10:20, 30:50].compute(), levels[1][10:20, 30:50])
    PILImage.fromarray(levels[2]).save(tmp_path / "x.png")
    with open_image(tmp_path / "x.png") as image:
        assert read_in_place(image, 0) is None


def test_plain_zarr_array_channels_first_and_last(tmp_path: Path) -> None:
    pixels = _smooth_rgb(64, 80)
    zarr.create_array(tmp_path / "hwc.zarr", data=pixels, chunks=(32, 32, 3))
    zarr.create_array(tmp_path / "chw.zarr", data=np.moveaxis(pixels, 2, 0), chunks=(3, 32, 32))
    zarr.create_array(tmp_path / "hw.zarr", data=pixels[..., 0], chunks=(32, 32))
    for name, expected in [("hwc", pixels), ("chw", pixels), ("hw", pixels[..., :1])]:
        with open_image(tmp_path / f"{name}.zarr") as image:
            assert image.kind == "slide" and image.mpp is None
            np.testing.assert_array_equal(image.read_region(0, 5, 7, 30, 40), expected[5:35, 7:47])
            np.testing.assert_array_equal(read_in_place(image, 0).compute(), expected)


def test_ome_zarr_multiscales_levels_and_mpp(tmp_path: Path) -> None:
    pixels = _smooth_rgb(64, 80)
    group = zarr.open_group(tmp_path / "slide.zarr", mode="w")
    datasets = []
    for index, factor in enumerate([1, 2]):
        level = np.moveaxis(pixels[::factor, ::factor], 2, 0)[None]  # (t, c, y, x)
        group.create_array(str(index), data=level, chunks=(1, 3, 32, 32))
        datasets.append(
            {
                "path": str(index),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, 1.0, 0.25 * factor, 0.25 * factor]}
                ],
            }
        )
    axes = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    with open_image(tmp_path / "slide.zarr") as image:
        assert image.levels == [(64, 80, 3), (32, 40, 3)]
        assert image.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(
            image.read_region(1, 2, 3, 10, 20), pixels[::2, ::2][2:12, 3:23]
        )
        np.testing.assert_array_equal(read_in_place(image, 1).compute(), pixels[::2, ::2])
        assert select_level(image, 0.6) == (1, pytest.approx(1.2))


def test_select_level(tmp_path: Path) -> None:
    path = tmp_path / "slide.ome.tif"
    _write_ome_pyramid(path, _smooth_rgb(400, 400), 0.25)  # levels at 0.25, 0.5, 1.0 µm
    with open_image(path) as image:
        assert select_level(image, 0.25) == (0, pytest.approx(1.0))
        assert select_level(image, 0.5) == (1, pytest.approx(1.0))
        assert select_level(image, 0.8) == (1, pytest.approx(1.6))
        assert select_level(image, 4.0) == (2, pytest.approx(4.0))
        assert select_level(image, 0.125) == (0, pytest.approx(0.5))  # upsample
        assert select_level(image, None) == (0, 1.0)


def test_select_level_without_mpp_is_an_input_error(tmp_path: Path) -> None:
    PILImage.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    with (
        open_image(tmp_path / "x.png") as image,
        pytest.raises(InputError, match=r"x\.png: no pixel size"),
    ):
        select_level(image, 0.5)


def test_real_tcga_svs(real_data: Path) -> None:
    path = real_data / "wsi-tcga-cr-7395" / "tcga-cr-7395-01a-01-ts1.svs"
    if not path.exists():
        pytest.skip(f"{path} absent")
    with open_image(path) as image:
        assert image.levels == [(3567, 4443, 3), (1783, 2221, 3)]
        assert image.mpp is None  # this crop's description has no MPP
        region = image.read_region(1, 700, 900, 300, 400)
    with tifffile.TiffFile(path) as tif:
        expected = tif.series[0].levels[1].asarray()[700:1000, 900:1300]
    np.testing.assert_array_equal(region, expected)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("16747_3_1.jpg", (885, 1036, 3)),
        ("covid-19-pneumonia-58-prior.jpg", (2373, 2373, 3)),
        ("00000001_000.png", (512, 512, 1)),
    ],
)
def test_real_txrv_xrays(real_data: Path, name: str, shape: tuple[int, int, int]) -> None:
    path = real_data / "cxr-txrv" / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    with open_image(path) as image:
        assert image.kind == "xray" and image.levels == [shape]
        pixels = image.read_region(0, 0, 0, shape[0], shape[1])
    expected = np.asarray(PILImage.open(path).convert("L"))
    assert np.abs(to_channels(pixels, 1)[..., 0].astype(int) - expected).max() <= 1


def test_decoded_tiles_are_cached_within_a_bound_and_shared_by_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.io.tiff import TiffImage

    level0 = _smooth_rgb(1024, 1024)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, level0, tile=(128, 128), photometric="rgb", compression="jpeg2000")
    tile_bytes = 128 * 128 * 3
    with TiffImage(path, Limits(), cache_bytes=10 * tile_bytes) as image:
        inner = image._stores[0].store_path.store._store  # tifffile's store, behind the cache
        decoded = _count_gets(inner)
        first = image.read_region(0, 100, 100, 200, 200)  # 3x3 tiles
        again = image.read_region(0, 130, 140, 150, 150)  # the same 3x3 tiles
        assert len(decoded) == 9  # the second read decoded nothing
        np.testing.assert_array_equal(first, level0[100:300, 100:300])
        np.testing.assert_array_equal(again, level0[130:280, 140:290])
        first[:] = 0  # a caller's array is its own: the cache is not changed through it
        np.testing.assert_array_equal(image.read_region(0, 100, 100, 10, 10), level0[100:110, 100:110])

        corners = [(y, x) for y in range(0, 1024 - 256, 96) for x in range(0, 1024 - 256, 96)]
        with ThreadPoolExecutor(2) as pool:  # two threads read, as a tile runner does
            regions = list(pool.map(lambda c: image.read_region(0, c[0], c[1], 256, 256), corners))
        for (y, x), region in zip(corners, regions, strict=True):
            np.testing.assert_array_equal(region, level0[y : y + 256, x : x + 256])
        assert image.tile_cache.nbytes <= 10 * tile_bytes  # never past its bound
