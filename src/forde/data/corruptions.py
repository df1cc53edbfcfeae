"""The 19 common corruptions of Hendrycks & Dietterich (ICLR 2019), as CIFAR-10-C / -100-C / Tiny-ImageNet-C made them.

Each function follows the published generation scripts step by step (same operations, same libraries where they
still exist, same float types, the truncating uint8 cast at the end), with the published per-severity parameters
for 32x32 images (table "cifar") and 64x64 images (table "tiny"). Work is vectorised over the batch; only steps
that are per-image calls in OpenCV/PIL (JPEG, pixelate, defocus filter, elastic warp, spatter's water relief)
loop over images. Reference quirks are kept on purpose and named where they happen.

Randomness: every image gets its own child generator from `rng.spawn`, so an image's corruption depends only on
`rng`'s state and its position in the batch, never on how the batch is chunked. The released sets were drawn from
an unseeded global stream, so regenerated sets share the recipe, not the pixels.

Other image sides H (square, H >= 8). Parameters that are pixel amounts (noise levels, blur sigmas and radii,
glass-blur delta, motion-blur length, JPEG quality) are used as published. What the scripts derive from their
image side is derived from H instead: elastic alpha, sigma and affine jitter are fractions of H, its affine
anchors sit at H//2 +- H//3; the fog plasma map has the next power of two >= H as side and is cropped to H;
pixelate goes through a max(1, int(H * factor)) square; the glass-blur sweep, zoom crops and the snow/spatter
layers span H; frost textures are resized by the table's factor times max(1, H / table side), so the H x H crop
always fits. With H = 32 on "cifar" and H = 64 on "tiny" this is exactly the reference.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import color as skcolor

from forde.data.corruption_names import CORRUPTIONS, SEVERITIES

MIN_SIDE = 8
FROST_DIR = Path(__file__).parent / "assets" / "frost"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
ZOOM_STEP = 0.01
_CHUNK = 256  # images per vectorised call: bounds memory, never changes results (see module docstring)


@dataclass(frozen=True)
class CorruptionTable:
    """Published parameters for one image side: `params[name][severity - 1]`."""

    name: str
    side: int  # the image side the scripts were written for
    frost_scale: float  # resize factor of the frost textures at that side
    params: dict[str, tuple]


# Values as printed in make_cifar_c.py / make_tinyimagenet_c.py. Tuples mean:
# glass (sigma, max_delta, iterations); defocus (disk radius, alias sigma); motion (ImageMagick radius, sigma);
# zoom: end of arange(1, end, 0.01); fog (strength, wibble decay); frost (image weight, frost weight);
# snow (mean, std, zoom, threshold, blur radius, blur sigma, blend); spatter (mean, std, sigma, threshold,
# intensity, 0 = water / 1 = mud); saturate (S multiplier, S offset); elastic (alpha, sigma, jitter) / side.
TABLES: dict[str, CorruptionTable] = {
    "cifar": CorruptionTable(
        "cifar",
        32,
        0.2,
        {
            "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
            "shot_noise": (500, 250, 100, 75, 50),
            "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
            "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
            "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
            "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
            "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
            "snow": (
                (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
                (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
            ),
            "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
            "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
            "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
            "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
            "elastic_transform": (
                (0, 0, 0.08),
                (0.05, 0.2, 0.07),
                (0.08, 0.06, 0.06),
                (0.1, 0.04, 0.05),
                (0.1, 0.03, 0.03),
            ),
            "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
            "jpeg_compression": (80, 65, 58, 50, 40),
            "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
            "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
            "spatter": (
                (0.62, 0.1, 0.7, 0.7, 0.5, 0),
                (0.65, 0.1, 0.8, 0.7, 0.5, 0),
                (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1),
                (0.65, 0.1, 0.5, 0.68, 0.6, 1),
            ),
            "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
        },
    ),
    "tiny": CorruptionTable(
        "tiny",
        64,
        0.3,
        {
            "gaussian_noise": (0.04, 0.08, 0.12, 0.15, 0.18),
            "shot_noise": (250, 100, 50, 30, 15),
            "impulse_noise": (0.01, 0.02, 0.05, 0.08, 0.14),
            "defocus_blur": ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
            "glass_blur": ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)),
            "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
            "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),
            "snow": (
                (0.1, 0.2, 1, 0.6, 8, 3, 0.8),
                (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
                (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
                (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
                (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6),
            ),
            "frost": ((1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)),
            "fog": ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
            "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
            "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
            "elastic_transform": (
                (0, 0, 0.08),
                (0.05, 0.3, 0.06),
                (0.1, 0.08, 0.06),
                (0.1, 0.03, 0.03),
                (0.16, 0.03, 0.02),
            ),
            "pixelate": (0.9, 0.8, 0.7, 0.6, 0.5),
            "jpeg_compression": (65, 58, 50, 40, 25),
            "speckle_noise": (0.15, 0.2, 0.25, 0.3, 0.35),
            "gaussian_blur": (0.5, 0.75, 1, 1.25, 1.5),
            "spatter": (
                (0.62, 0.1, 0.7, 0.7, 0.6, 0),
                (0.65, 0.1, 0.8, 0.7, 0.6, 0),
                (0.65, 0.3, 1, 0.69, 0.6, 0),
                (0.65, 0.1, 0.7, 0.68, 0.6, 1),
                (0.65, 0.1, 0.5, 0.67, 0.6, 1),
            ),
            "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)),
        },
    ),
}


def default_table(side: int) -> str:
    """The table a side falls under: up to 48 px the CIFAR parameters, above that the Tiny-ImageNet ones."""
    return "cifar" if side <= 48 else "tiny"


def corrupt(
    images: np.ndarray, name: str, severity: int, rng: np.random.Generator, table: str | None = None
) -> np.ndarray:
    """Corrupt uint8 [N, H, W, C] images (C = 3, or 1: grey is corrupted as RGB and averaged back).

    `table` is "cifar" or "tiny"; None picks by side (see `default_table`); sides other than the table's follow
    the rule in the module docstring. Returns uint8 of the input's shape, cast by truncation as the release did.
    Deterministic given `rng`; each image draws from its own child generator.
    """
    images = np.asarray(images)
    _check_request(images, name, severity, table)
    if images.shape[-1] == 1:
        rgb = corrupt(np.repeat(images, 3, axis=-1), name, severity, rng, table)
        return rgb.mean(axis=-1, keepdims=True).astype(np.uint8)
    spec = TABLES[table or default_table(images.shape[1])]
    params = spec.params[name][severity - 1]
    out = np.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK]
        result = _FUNCTIONS[name](chunk, params, rng.spawn(len(chunk)), spec)
        out[start : start + len(chunk)] = result.astype(np.uint8)  # truncation toward zero, values are in 0..255
    return out


def _check_request(images: np.ndarray, name: str, severity: int, table: str | None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, H, W, 1 or 3] images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] != images.shape[2] or images.shape[1] < MIN_SIDE:
        raise ValueError(f"expected square images of side >= {MIN_SIDE}, got {images.shape[1]}x{images.shape[2]}")
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption '{name}'; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    if table is not None and table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)} or None, got {table!r}")


# ---------------------------------------------------------------------------------------------- shared steps


def _per_image(rngs: list[np.random.Generator], draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Stack one draw per image, each from that image's own generator."""
    return np.stack([draw(g) for g in rngs])


def _to_255(x01: np.ndarray) -> np.ndarray:
    """The scripts' closing `np.clip(x, 0, 1) * 255` (the uint8 cast follows in `corrupt`)."""
    return np.clip(x01, 0, 1) * 255


def _gaussian(
    batch: np.ndarray, sigma: float, mode: Literal["nearest", "reflect"] = "nearest", truncate: float = 4.0
) -> np.ndarray:
    """scikit-image `gaussian` applied to every image of a batch: blurs axes 1 and 2 only (images and channels
    stay separate); the defaults are scikit-image's."""
    sigmas = (0, sigma, sigma) + (0,) * (batch.ndim - 3)
    return ndimage.gaussian_filter(batch, sigmas, mode=mode, truncate=truncate)


def _clipped_zoom(batch: np.ndarray, factor: float) -> np.ndarray:
    """The scripts' `clipped_zoom` on axes 1, 2 of a batch: centre crop of side ceil(H/factor), SciPy `zoom`
    order 1 back up (output side round(crop*factor), sample i at i*(crop-1)/(out-1)), centre-trimmed to H.

    Bilinear interpolation is separable: it runs as W @ crop @ W.T with a 2-taps-per-row matrix W instead of
    `ndimage.zoom` (same values up to float rounding, far faster on batches); float64 inside, as SciPy.
    """
    side = batch.shape[1]
    crop = int(np.ceil(side / factor))
    top = (side - crop) // 2
    weights = _zoom_matrix(crop, factor, side)
    x = np.moveaxis(batch[:, top : top + crop, top : top + crop].astype(np.float64), (1, 2), (-2, -1))
    return np.moveaxis(weights @ x @ weights.T, (-2, -1), (1, 2)).astype(batch.dtype)


def _zoom_matrix(crop: int, factor: float, side: int) -> np.ndarray:
    """[side, crop] linear-interpolation weights of the output samples kept after the centre trim."""
    out = int(round(crop * factor))
    trim = (out - side) // 2
    coords = np.arange(trim, trim + side) * ((crop - 1) / (out - 1))
    lo = np.minimum(np.floor(coords).astype(int), crop - 1)
    rows = np.arange(side)
    weights = np.zeros((side, crop))
    np.add.at(weights, (rows, lo), 1 - (coords - lo))
    np.add.at(weights, (rows, np.minimum(lo + 1, crop - 1)), coords - lo)
    return weights


def motion_blur_taps(radius: float) -> int:
    """ImageMagick's kernel length for a radius (GetOptimalKernelWidth1D with radius > 0)."""
    return 2 * math.ceil(radius) + 1


def motion_blur_offsets(radius: float, angle: float) -> np.ndarray:
    """(row, col) offset of each tap from the output pixel, rounded the way MotionBlurImage rounds them."""
    taps = motion_blur_taps(radius)
    point_x = taps * math.sin(math.radians(angle))
    point_y = taps * math.cos(math.radians(angle))
    length = math.hypot(point_x, point_y)
    i = np.arange(taps)
    return np.stack([np.ceil(i * point_x / length - 0.5), np.ceil(i * point_y / length - 0.5)], axis=1).astype(int)


def _imagemagick_motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's MotionBlurImage on uint8 [N, H, W, C], one angle (degrees) per image.

    One-sided Gaussian weights exp(-i^2 / 2 sigma^2), i = 0..taps-1, normalised; tap i reads the pixel at the
    rounded offset along the angle, clamped to the image (ImageMagick's default "edge" virtual pixels). The sum is
    rounded to a 16-bit quantum, then truncated to 8 bits: this matches ImageMagick 6.9 Q16 (`convert
    -motion-blur`) bit for bit on CIFAR images, where plain rounding would differ by 1 on half the pixels.
    """
    n, h, w = x.shape[:3]
    i = np.arange(motion_blur_taps(radius))
    weights = np.exp(-(i**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    offsets = np.stack([motion_blur_offsets(radius, a) for a in angles])  # [N, taps, 2]
    images = np.arange(n)[:, None, None]
    acc = np.zeros(x.shape, dtype=np.float64)
    for t, weight in enumerate(weights):
        rows = np.clip(np.arange(h) + offsets[:, t, :1], 0, h - 1)  # [N, H]
        cols = np.clip(np.arange(w) + offsets[:, t, 1:], 0, w - 1)  # [N, W]
        acc += weight * x[images, rows[:, :, None], cols[:, None, :]]
    quantum = np.clip(np.floor(acc * 257.0 + 0.5), 0, 65535).astype(np.int64)  # rounded to a 16-bit quantum
    return (quantum // 257).astype(np.uint8)  # back to 8 bits by truncation


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def plasma_fractal_draws(size: int) -> int:
    """How many uniform draws the diamond-square map of a given side consumes."""
    return 3 * sum((size // step) ** 2 for step in (1 << k for k in range(1, size.bit_length())))


def _plasma_fractal(rngs: list[np.random.Generator], size: int, decay: float) -> np.ndarray:
    """Diamond-square height maps [N, size, size] in [0, 1], as the scripts' `plasma_fractal`.

    Wrap-around neighbours; each new point = mean of 4 neighbours + w * U(-w, w) with w = 100 at the top
    octave and divided by `decay` per octave; finally min-max normalised per map.
    """
    draws = _per_image(rngs, lambda g: g.random(plasma_fractal_draws(size)))
    grid = np.empty((len(rngs), size, size))
    grid[:, 0, 0] = 0.0
    used, step, wibble = 0, size, 100.0

    def wibbled_mean(neighbour_sum: np.ndarray) -> np.ndarray:
        nonlocal used
        count = neighbour_sum.shape[1] * neighbour_sum.shape[2]
        uniform = -wibble + (2 * wibble) * draws[:, used : used + count].reshape(neighbour_sum.shape)
        used += count
        return neighbour_sum / 4 + wibble * uniform

    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares += np.roll(squares, -1, axis=2)
        grid[:, half::step, half::step] = wibbled_mean(squares)
        centres = grid[:, half::step, half::step]
        grid[:, ::step, half::step] = wibbled_mean(
            (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=2))
        )
        grid[:, half::step, ::step] = wibbled_mean(
            (centres + np.roll(centres, 1, axis=2)) + (corners + np.roll(corners, -1, axis=1))
        )
        step //= 2
        wibble /= decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    return grid / grid.max(axis=(1, 2), keepdims=True)


def frost_scale(spec: CorruptionTable, side: int) -> float:
    """Texture resize factor: the table's below its side, growing with H above it so the crop always fits."""
    return spec.frost_scale * max(1.0, side / spec.side)


@lru_cache(maxsize=8)
def frost_textures(scale: float) -> tuple[np.ndarray, ...]:
    """frost1..frost5 as OpenCV reads them (BGR, alpha dropped), resized by `scale` with bilinear interpolation."""
    textures = []
    for name in FROST_FILES:
        raw = np.frombuffer((FROST_DIR / name).read_bytes(), np.uint8)
        image = cv2.imdecode(raw, cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError(f"{FROST_DIR / name}: OpenCV cannot decode it; reinstall forde to restore the file")
        textures.append(cv2.resize(image, (0, 0), fx=scale, fy=scale))
    return tuple(textures)


def disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The scripts' anti-aliased disk: 17x17 grid (radius <= 8), ones inside the radius, normalised,
    then a 3x3 OpenCV Gaussian blur with the alias sigma; float32 throughout."""
    if radius > 8:
        raise ValueError("the published defocus radii are all <= 8")
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    return cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias_sigma)


def glass_blur_shuffle(x: np.ndarray, delta: int, shifts: np.ndarray) -> np.ndarray:
    """One pass of the scripts' local pixel "swap" over uint8 [N, H, W, C], in place.

    Rows and columns are visited from H - delta down to delta + 1; pixel (h, w) takes the value of
    (h + dy, w + dx). The scripts' tuple assignment of two views copies rather than swaps: the neighbour keeps
    its value. `shifts` [N, positions, 2] holds each image's (dx, dy) per visited position, in visit order.
    """
    side = x.shape[1]
    coords = range(side - delta, delta, -1)
    images = np.arange(len(x))
    position = 0
    for h in coords:
        for w in coords:
            dx, dy = shifts[:, position, 0], shifts[:, position, 1]
            x[:, h, w] = x[images, h + dy, w + dx]
            position += 1
    return x


# ---------------------------------------------------------------------------------------------- the corruptions
# Each takes uint8 [N, H, W, 3], the severity's parameters, one generator per image and the table, and returns
# values in 0..255 (float, or uint8 where the script's last step yields uint8).


def _gaussian_noise(x, std, rngs, spec):
    return _to_255(x / 255.0 + _per_image(rngs, lambda g: g.normal(size=x.shape[1:], scale=std)))


def _shot_noise(x, scale, rngs, spec):
    rates = x / 255.0 * scale
    return _to_255(np.stack([g.poisson(r) for g, r in zip(rngs, rates)]) / scale)


def _impulse_noise(x, amount, rngs, spec):
    """scikit-image's s&p: every element flips with prob. `amount`, to 1 or 0 with equal odds."""
    flips = _per_image(rngs, lambda g: g.random((2,) + x.shape[1:]))
    flipped, salted = flips[:, 0] < amount, flips[:, 1] < 0.5
    out = x / 255.0
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out * 255


def _speckle_noise(x, std, rngs, spec):
    x = x / 255.0
    return _to_255(x + x * _per_image(rngs, lambda g: g.normal(size=x.shape[1:], scale=std)))


def _gaussian_blur(x, sigma, rngs, spec):
    return _to_255(_gaussian(x / 255.0, sigma))


def _glass_blur(x, params, rngs, spec):
    sigma, delta, iterations = params
    x = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    positions = max(0, x.shape[1] - 2 * delta) ** 2
    # randint(-delta, delta): the upper bound is excluded, as in the scripts
    shifts = _per_image(rngs, lambda g: g.integers(-delta, delta, size=(iterations, positions, 2)))
    for i in range(iterations):
        glass_blur_shuffle(x, delta, shifts[:, i])
    return _to_255(_gaussian(x / 255.0, sigma))


def _defocus_blur(x, params, rngs, spec):
    kernel = disk_kernel(*params)
    return _to_255(np.stack([cv2.filter2D(img, -1, kernel) for img in x / 255.0]))


def _motion_blur(x, params, rngs, spec):
    radius, sigma = params
    angles = np.array([g.uniform(-45, 45) for g in rngs])
    return _imagemagick_motion_blur(x, radius, sigma, angles)


def zoom_factors(end: float) -> np.ndarray:
    """NumPy float arange(1, end, 0.01): its rounding keeps `end` itself for 1.06 and 1.11 (7 and 12 factors)."""
    return np.arange(1, end, ZOOM_STEP)


def _zoom_blur(x, end, rngs, spec):
    x = (x / 255.0).astype(np.float32)
    factors = zoom_factors(end)
    out = np.zeros_like(x)
    for factor in factors:
        out += _clipped_zoom(x, factor)
    return _to_255((x + out) / (len(factors) + 1))


def _snow(x, params, rngs, spec):
    mean, std, zoom, threshold, radius, sigma, blend = params
    n, side = x.shape[:2]
    layers, angles = [], []
    for g in rngs:  # draw order of the scripts: the snow field, then the blur angle
        layers.append(g.normal(size=(side, side), loc=mean, scale=std))
        angles.append(g.uniform(-135, -45))
    layer = _clipped_zoom(np.stack(layers), zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)[..., None]
    layer = _imagemagick_motion_blur(layer, radius, sigma, np.array(angles)) / 255.0
    x = x.astype(np.float32) / 255.0
    grey = cv2.cvtColor(x.reshape(n * side, side, 3), cv2.COLOR_RGB2GRAY).reshape(n, side, side, 1)
    x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
    return _to_255(x + layer + np.rot90(layer, k=2, axes=(1, 2)))


def _frost(x, params, rngs, spec):
    image_weight, frost_weight = params
    side = x.shape[1]
    textures = frost_textures(frost_scale(spec, side))
    crops = []
    for g in rngs:
        texture = textures[g.integers(5)]
        top, left = g.integers(0, texture.shape[0] - side), g.integers(0, texture.shape[1] - side)
        crops.append(texture[top : top + side, left : left + side, ::-1])  # BGR -> RGB
    return np.clip(image_weight * x + frost_weight * np.stack(crops), 0, 255)


def _fog(x, params, rngs, spec):
    strength, decay = params
    side = x.shape[1]
    x = x / 255.0
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    fractal = _plasma_fractal(rngs, _next_power_of_two(side), decay)[:, :side, :side, None]
    return _to_255((x + strength * fractal) * peak / (peak + strength))


def _brightness(x, offset, rngs, spec):
    hsv = skcolor.rgb2hsv(x / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + offset, 0, 1)
    return _to_255(skcolor.hsv2rgb(hsv))


def _contrast(x, factor, rngs, spec):
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_255((x - means) * factor + means)


def _elastic_transform(x, params, rngs, spec):
    side = x.shape[1]
    alpha, sigma, jitter = (side * p for p in params)
    centre, offset = np.float32(side // 2), side // 3
    anchors = np.array(
        [[centre + offset, centre + offset], [centre + offset, centre - offset], [centre - offset, centre - offset]],
        dtype=np.float32,
    )
    jitters, fields_x, fields_y = [], [], []
    for g in rngs:  # draw order of the scripts: affine jitter, then the x field, then the y field
        jitters.append(g.uniform(-jitter, jitter, size=(3, 2)).astype(np.float32))
        fields_x.append(g.uniform(-1, 1, size=(side, side)))
        fields_y.append(g.uniform(-1, 1, size=(side, side)))
    x = x.astype(np.float32) / 255.0
    warped = np.stack(
        [
            cv2.warpAffine(
                img, cv2.getAffineTransform(anchors, anchors + jit), (side, side), borderMode=cv2.BORDER_REFLECT_101
            )
            for img, jit in zip(x, jitters)
        ]
    )
    dx = (_gaussian(np.stack(fields_x), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_gaussian(np.stack(fields_y), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    grid = np.indices(dx.shape)  # image, row, column
    coords = np.stack([grid[0], grid[1] + dy, grid[2] + dx])
    channels = [ndimage.map_coordinates(warped[..., c], coords, order=1, mode="reflect") for c in range(3)]
    return _to_255(np.stack(channels, axis=-1))


def pixelate_side(side: int, factor: float) -> int:
    """Side of the intermediate image: int(H * factor) as the scripts, at least 1 pixel."""
    return max(1, int(side * factor))


def _pixelate(x, factor, rngs, spec):
    side = x.shape[1]
    small = pixelate_side(side, factor)
    box = Image.Resampling.BOX
    return np.stack(
        [np.asarray(Image.fromarray(img).resize((small, small), box).resize((side, side), box)) for img in x]
    )


def _jpeg_compression(x, quality, rngs, spec):
    return np.stack([_jpeg_round_trip(img, quality) for img in x])


def _jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    """PIL JPEG encode at `quality` (other settings PIL's defaults), then decode."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _spatter(x, params, rngs, spec):
    mean, std, sigma, threshold, intensity, mud = params
    side = x.shape[1]
    liquid = _gaussian(_per_image(rngs, lambda g: g.normal(size=(side, side), loc=mean, scale=std)), sigma)
    liquid[liquid < threshold] = 0
    x = x.astype(np.float32) / 255.0
    if mud:
        return _mud(x, liquid, threshold, intensity)
    return _water(x, liquid, intensity)


# The scripts' emboss kernel (rows -2,-1,0 / -1,1,1 / 0,1,2).
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
# Colours as the scripts build them: c / 255. times a float32 array of ones, hence float32.
_WATER_RGB = np.array([175 / 255.0, 238 / 255.0, 238 / 255.0], dtype=np.float32)  # pale turquoise
_MUD_RGB = np.array([63 / 255.0, 42 / 255.0, 20 / 255.0], dtype=np.float32)


def _water(x: np.ndarray, liquid: np.ndarray, intensity: float) -> np.ndarray:
    # The scripts replace the layer by its unchecked uint8 cast (values above 255 wrap around, as on x86) and
    # weight the relief with that uint8 layer, in float32.
    layers = (liquid * 255).astype(np.int64).astype(np.uint8)
    m = layers * np.stack([_water_relief(layer) for layer in layers])
    peak = m.max(axis=(1, 2), keepdims=True)
    # A layer with no liquid left gives 0/0 (NaN) in the scripts; it gets no water here.
    m = np.divide(m, peak, out=np.zeros_like(m), where=peak > 0) * intensity
    return _to_255(x + m[..., None] * _WATER_RGB)


def _water_relief(layer: np.ndarray) -> np.ndarray:
    """Embossed distance-to-edge map of one uint8 liquid layer (OpenCV steps of the scripts)."""
    dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.filter2D(dist, cv2.CV_8U, _EMBOSS)
    return cv2.blur(dist, (3, 3)).astype(np.float32)


def _mud(x: np.ndarray, liquid: np.ndarray, threshold: float, intensity: float) -> np.ndarray:
    m = _gaussian((liquid > threshold).astype(np.float32), intensity)
    m[m < 0.8] = 0
    m = m[..., None]
    return _to_255(x * (1 - m) + m * _MUD_RGB)


def _saturate(x, params, rngs, spec):
    multiplier, offset = params
    hsv = skcolor.rgb2hsv(x / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * multiplier + offset, 0, 1)
    return _to_255(skcolor.hsv2rgb(hsv))


_FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "spatter": _spatter,
    "saturate": _saturate,
}
assert tuple(_FUNCTIONS) == CORRUPTIONS and all(tuple(t.params) == CORRUPTIONS for t in TABLES.values())
