"""Training augmentations in plain numpy/scipy/scikit-image, one sample at a time.

A sample is a normalised image (h, w, C) float32 in [0, 1] (percentile or scale
normalisation) and its label map (h, w) int64. Geometric transforms move both; photometric
ones touch only the image. Every random draw comes from the numpy Generator passed in, so a
sample is a pure function of its seed (what makes training reproducible and resumable).
No albumentations / torchvision: the first pulls in OpenCV, the second a CUDA torch build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import color

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """Which augmentations run and how strongly. Zero / False turns one off."""

    hflip: bool = True
    vflip: bool = False
    rot90: bool = False  # square samples only; meaningless for upright X-rays
    rotate_deg: float = 0.0  # small affine: rotation in [-r, r]
    scale: float = 0.0  # isotropic zoom in [1 - s, 1 + s]
    aspect: float = 0.0  # anisotropic stretch: x/y ratio in [1 - a, 1 + a]
    translate: float = 0.0  # shift, as a fraction of the side, in [-t, t]
    brightness: float = 0.0  # additive, in [-b, b]
    contrast: float = 0.0  # multiplicative about 0.5, in [1 - c, 1 + c]
    gamma: float = 0.0  # exponent in [exp(-g), exp(g)]
    opacity: float = 0.0  # X-rays: 0-3 soft bright blobs of height up to o (consolidation, effusion)
    hsv: float = 0.0  # H&E: hue shift in [-h, h] turns, saturation/value scale in [1 - 2h, 1 + 2h]
    stain: float = 0.0  # H&E: H/E/DAB densities scaled in [1 - s, 1 + s] (Tellez et al. 2018),
    # and up to 2s of the eosin density moved into haematoxylin (pink slides turned purple)

    def __post_init__(self) -> None:
        for name in ("rotate_deg", "scale", "aspect", "translate", "brightness", "contrast",
                     "gamma", "opacity", "hsv", "stain"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        if self.scale >= 1 or self.aspect >= 1 or self.contrast >= 1:
            raise ConfigError(f"scale, aspect and contrast must be < 1, got {self}")

    @property
    def photometric(self) -> bool:
        return any((self.brightness, self.contrast, self.gamma, self.opacity, self.hsv, self.stain))

    @property
    def affine(self) -> bool:
        return any((self.rotate_deg, self.scale, self.aspect, self.translate))


def augment(image: np.ndarray, labels: np.ndarray, aug: Augment,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One randomly augmented copy of (image (h, w, C) in [0, 1], labels (h, w))."""
    image, labels = flip_rotate(image, labels, aug, rng)
    if aug.affine:
        image, labels = random_affine(image, labels, aug, rng)
    if aug.hsv or aug.stain:
        image = colour_jitter(image, aug, rng)
    if aug.opacity:
        image = random_opacities(image, aug.opacity, rng)
    if aug.brightness or aug.contrast or aug.gamma:
        image = intensity_jitter(image, aug, rng)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(labels)


def flip_rotate(image: np.ndarray, labels: np.ndarray, aug: Augment,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal/vertical flips and quarter turns (exact, no interpolation)."""
    if aug.hflip and rng.random() < 0.5:
        image, labels = image[:, ::-1], labels[:, ::-1]
    if aug.vflip and rng.random() < 0.5:
        image, labels = image[::-1], labels[::-1]
    if aug.rot90 and image.shape[0] == image.shape[1]:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    return image, labels


def random_affine(image: np.ndarray, labels: np.ndarray, aug: Augment,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotation, zoom, stretch and shift about the centre; outside pixels become 0
    (image bilinear, labels nearest)."""
    h, w = labels.shape
    angle = math.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    zoom = rng.uniform(1 - aug.scale, 1 + aug.scale)
    stretch = rng.uniform(1 - aug.aspect, 1 + aug.aspect)
    shift = rng.uniform(-aug.translate, aug.translate, size=2) * (h, w)
    # forward map (y, x) -> R · diag(zoom/√s, zoom·√s) · (y, x); scipy wants its inverse
    forward = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = forward @ np.diag([zoom / math.sqrt(stretch), zoom * math.sqrt(stretch)])
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2, (w - 1) / 2])
    offset = centre - inverse @ (centre + shift)
    channels = [ndimage.affine_transform(image[..., c], inverse, offset, order=1, mode="constant")
                for c in range(image.shape[2])]
    moved = ndimage.affine_transform(labels, inverse, offset, order=0, mode="constant")
    return np.stack(channels, axis=-1), moved


def intensity_jitter(image: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast about mid-grey, then gamma; kept in [0, 1]."""
    contrast = rng.uniform(1 - aug.contrast, 1 + aug.contrast)
    brightness = rng.uniform(-aug.brightness, aug.brightness)
    gamma = math.exp(rng.uniform(-aug.gamma, aug.gamma))
    out = np.clip((image - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    return out**gamma


def random_opacities(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Add 0-3 smooth bright blobs (gaussian, 5-20% of the side wide), labels untouched:
    diseased lungs (consolidation, effusion) are whiter than the clear lungs most training
    masks were drawn on, and are still lung."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    blobs = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.05, 0.2) * min(h, w)
        blobs += rng.uniform(0, strength) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return np.clip(image + blobs[..., None], 0.0, 1.0)


def colour_jitter(image: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """H&E colour variation: stain-space (HED) scaling, then HSV hue/saturation/value shifts."""
    if image.shape[2] != 3:
        raise ConfigError(f"hsv/stain jitter needs RGB samples, got {image.shape[2]} channels")
    out = image
    if aug.stain:
        hed = color.rgb2hed(out)
        hed = hed * rng.uniform(1 - aug.stain, 1 + aug.stain, size=3)
        hed[..., 0] += rng.uniform(0, 2 * aug.stain) * hed[..., 1]
        out = np.clip(color.hed2rgb(hed), 0.0, 1.0)
    if aug.hsv:
        hsv = color.rgb2hsv(out)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-aug.hsv, aug.hsv)) % 1.0
        hsv[..., 1:] *= rng.uniform(1 - 2 * aug.hsv, 1 + 2 * aug.hsv, size=2)
        out = color.hsv2rgb(np.clip(hsv, 0.0, 1.0))
    return out.astype(np.float32)
