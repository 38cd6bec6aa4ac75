"""Labels from classical image analysis, for training where no manual annotation exists.

  tissue   H&E tissue vs glass on a whole-slide preview: pipeline.engine.tissue's detector, the one
           runs use to skip background tiles (the tissue-he model learns it).
  nuclei   haematoxylin from colour deconvolution (Ruifrok & Johnston 2001, scikit-image's
           rgb2hed), smoothed, cut at one threshold for the whole slide, cleaned, touching
           nuclei split by a distance-transform watershed. Pseudo-labels: for demonstration.

Label images are written as files the training readers open like any mask: the tissue mask
as a PNG at preview size, the nuclei mask as a tiled TIFF at level 0 written tile by tile, so
a slide is never decoded whole. Sizes are given in µm and converted with the pixel size.
Used by the slide recipes (recipes.shipped); the library never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image as PILImage
from scipy import ndimage
from skimage import color, feature, filters, morphology, segmentation

from pipeline.engine.tissue import tissue_mask
from pipeline.io import open_image, preview


def write_tissue_labels(slide: str | Path, out: str | Path) -> Path:
    """The slide's tissue mask (0/255 PNG) at preview size, by the same classical detector
    the run uses to skip background tiles (pipeline.engine.tissue, with its safety margin)."""
    with open_image(slide) as image:
        overview = preview(image)
    rgb = np.clip(np.rint(overview[..., :3]), 0, 255).astype(np.uint8)
    PILImage.fromarray(tissue_mask(rgb).astype(np.uint8) * 255).save(out)
    return Path(out)


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (h, w) of an RGB H&E image."""
    return color.rgb2hed(rgb)[..., 0].astype(np.float32)


def haematoxylin_threshold(slide: str | Path, tissue: np.ndarray, tiles: int = 16,
                           size: int = 512, seed: int = 0) -> float:
    """One Otsu threshold on haematoxylin for the whole slide, from `tiles` level-0 tiles
    that lie in tissue (the top 0.5% clipped: ink and debris would drag Otsu upwards)."""
    rng = np.random.default_rng(seed)
    values = []
    with open_image(slide) as image:
        h, w = image.levels[0][:2]
        cells = np.argwhere(tissue)
        for cy, cx in cells[rng.choice(len(cells), size=min(tiles, len(cells)), replace=False)]:
            y = int(min(max(cy * h / tissue.shape[0] - size / 2, 0), h - size))
            x = int(min(max(cx * w / tissue.shape[1] - size / 2, 0), w - size))
            values.append(haematoxylin(image.read_region(0, y, x, size, size)[..., :3]).ravel())
    sample = np.concatenate(values)
    return float(filters.threshold_otsu(np.minimum(sample, np.percentile(sample, 99.5))))


def nuclei_mask(rgb: np.ndarray, threshold: float, mpp: float, min_um2: float = 8.0,
                max_hole_um2: float = 10.0, split: bool = True) -> np.ndarray:
    """(h, w, 3) uint8 H&E at `mpp` µm/px -> bool nuclei mask (touching nuclei split)."""
    density = filters.gaussian(haematoxylin(rgb), sigma=0.5 / mpp)
    nuclei = morphology.opening(density > threshold, morphology.disk(max(1, round(0.5 / mpp))))
    nuclei = morphology.remove_small_holes(nuclei, max_size=int(max_hole_um2 / mpp**2))
    nuclei = morphology.remove_small_objects(nuclei, max_size=int(min_um2 / mpp**2))
    return split_touching(nuclei, min_distance=max(2, round(2.5 / mpp))) if split else nuclei


def split_touching(mask: np.ndarray, min_distance: int) -> np.ndarray:
    """Cut one-pixel lines between blobs that a distance-transform watershed separates."""
    distance = ndimage.distance_transform_edt(mask)
    blobs, _ = ndimage.label(mask)
    peaks = feature.peak_local_max(distance, min_distance=min_distance, labels=blobs, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    regions = segmentation.watershed(-distance, markers, mask=mask)
    # a pixel next to a different (higher-numbered) region is on a cut line
    neighbour = ndimage.grey_dilation(regions, size=3)
    return mask & ~((neighbour != regions) & (regions > 0) & (neighbour > 0))


def write_nuclei_labels(slide: str | Path, out: str | Path, mpp: float, threshold: float,
                        tile: int = 256, margin: int = 32) -> Path:
    """A level-0 nuclei mask (0/255, tiled TIFF) computed tile by tile, each tile with a
    margin so that smoothing and the watershed see across tile edges."""
    with open_image(slide) as image:
        h, w = image.levels[0][:2]
        tifffile.imwrite(out, _nuclei_tiles(image, threshold, mpp, tile, margin), shape=(h, w),
                         dtype=np.uint8, tile=(tile, tile), compression="zlib", photometric="minisblack")
    return Path(out)


def _nuclei_tiles(image, threshold: float, mpp: float, tile: int, margin: int) -> Iterator[np.ndarray]:
    """Tiles in TIFF order (rows of tiles), each (tile, tile), zero-padded at the edges."""
    h, w = image.levels[0][:2]
    for ty in range(math.ceil(h / tile)):
        for tx in range(math.ceil(w / tile)):
            y0, x0 = ty * tile, tx * tile
            ry0, rx0 = max(y0 - margin, 0), max(x0 - margin, 0)
            ry1, rx1 = min(y0 + tile + margin, h), min(x0 + tile + margin, w)
            rgb = image.read_region(0, ry0, rx0, ry1 - ry0, rx1 - rx0)[..., :3]
            mask = nuclei_mask(rgb, threshold, mpp)[y0 - ry0 : y0 - ry0 + tile, x0 - rx0 : x0 - rx0 + tile]
            out = np.zeros((tile, tile), np.uint8)
            out[: mask.shape[0], : mask.shape[1]] = mask * 255
            yield out
