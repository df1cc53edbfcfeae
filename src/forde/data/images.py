"""Decode image files into one uint8 [N, C, H, W] array: the slow step of every folder-based dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from forde.config import DataError
from forde.config.schema import MAX_IMAGE_PIXELS
from forde.data.base import Split
from forde.errors import one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes of 16-bit greyscale images (PNG, TIFF)


def _refuse(path: Path, mode: str, why: str, fix: str) -> NoReturn:
    raise DataError(f"{path}: an image of Pillow's mode {mode} {why}; {fix}")


def rgb_pixels(img: Image.Image, path: Path) -> np.ndarray:
    """uint8 [3, H, W] of a decoded image, every mode Pillow reads taken at its real range:
    - 8-bit modes (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, ...): Pillow's conversion to RGB (alpha dropped, not
      blended; a palette's transparency likewise);
    - 16-bit greyscale (I;16*): round(v * 255 / 65535); 32-bit integers (I) the same, when they lie in 0..65535;
    - 32-bit floats (F): round(v * 255) when every value lies in [0, 1];
    anything else is refused in one line naming the file and the mode."""
    mode = img.mode
    if mode in SIXTEEN_BIT or mode == "I":
        values = np.asarray(img).astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            _refuse(path, mode, f"holds values in [{low}, {high}], outside 16 bits", "save it as 8 or 16 bits")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[None], 3, axis=0)
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all() or (values.size and (values.min() < 0 or values.max() > 1)):
            shown = f"[{np.nanmin(values):g}, {np.nanmax(values):g}]" if np.isfinite(values).any() else "no number"
            _refuse(path, mode, f"holds values in {shown}, not in [0, 1]", "scale it to [0, 1], or save it as 8 bits")
        grey = np.rint(values * 255).astype(np.uint8)
        return np.repeat(grey[None], 3, axis=0)
    try:
        rgb = img.convert("RGBA" if mode in ("P", "PA") else "RGB").convert("RGB")
    except ValueError as err:
        _refuse(path, mode, f"cannot be read as RGB ({one_line(err)})", "convert it to RGB or greyscale")
    return np.asarray(rgb).transpose(2, 0, 1)


def read_rgb(path: Path) -> np.ndarray:
    """One image file as uint8 [3, H, W] (see `rgb_pixels`). A file PIL cannot decode to the end (cut short, not an
    image) is a DataError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return rgb_pixels(img, path)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a readable image ({one_line(err)}); replace or remove it") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a readable image ({one_line(err)}); replace or remove it") from None


def available_memory() -> int | None:
    """Bytes of memory this machine can give without swapping (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits_in_memory(nbytes: int, what: str, fix: str) -> None:
    """One line when `what` needs more memory than this machine has available (with a margin for the rest)."""
    available = available_memory()
    if available is not None and nbytes > 0.9 * available:
        raise DataError(f"{what} needs {gib(nbytes)}, over the {gib(available)} of memory available here; {fix}")


def decode_images(
    paths: Sequence[Path], desc: str = "decoding images", chunk: int = 256, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode `paths` (in order) into uint8 [N, 3, H, W], with a progress bar.

    Every image must have one size: models need one input shape. The sizes are read from the files' headers
    first: an image over `max_pixels` (data.max_image_pixels), a size that differs from the others, or a set that
    would not fit in memory is one line before anything is decoded. PIL releases the GIL while decoding, so
    threads working on chunks of files speed this up without copying arrays between processes.
    """
    if not paths:
        raise ValueError("no images to decode")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(image_size, paths, chunksize=chunk))
    for path, (width, height) in zip(paths, sizes):
        if width * height > max_pixels:
            raise DataError(
                f"{path} is {width}x{height} ({width * height:,} pixels), over the limit of {max_pixels:,} "
                "(data.max_image_pixels); resize it, or raise the limit if the set really has images this large"
            )
    width, height = sizes[0]
    for path, size in zip(paths, sizes):
        if size != (width, height):
            raise DataError(
                f"all images must share one size, but {path} is {size[0]}x{size[1]} while {paths[0]} is "
                f"{width}x{height}; resize them to one size first"
            )
    check_fits_in_memory(
        len(paths) * 3 * height * width,
        f"decoding {len(paths):,} images of {width}x{height}",
        "import a smaller set, or smaller images",
    )
    out = np.empty((len(paths), 3, height, width), dtype=np.uint8)

    def decode(start: int) -> int:
        end = min(start + chunk, len(paths))
        for i in range(start, end):
            image = read_rgb(paths[i])
            if image.shape != out.shape[1:]:  # the header said otherwise
                raise DataError(
                    f"{paths[i]} decodes to {image.shape[2]}x{image.shape[1]}, not the {width}x{height} of its header"
                    "; replace or remove it"
                )
            out[i] = image
        return end - start

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        with tqdm(total=len(paths), desc=desc, unit="img") as bar:
            for done in pool.map(decode, range(0, len(paths), chunk)):
                bar.update(done)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, stop instead of decoding the rest
    return out


def decode_splits(
    listed: dict[str, tuple[list[Path], list[int]]], desc: str, max_pixels: int = MAX_IMAGE_PIXELS
) -> dict[str, Split]:
    """{split: (paths, labels)} -> {split: Split}, decoding every split in one pass (one size check, one bar)."""
    images = decode_images([p for paths, _ in listed.values() for p in paths], desc=desc, max_pixels=max_pixels)
    splits, start = {}, 0
    for split, (paths, labels) in listed.items():
        splits[split] = Split(
            torch.from_numpy(images[start : start + len(paths)]), torch.tensor(labels, dtype=torch.int64)
        )
        start += len(paths)
    return splits
