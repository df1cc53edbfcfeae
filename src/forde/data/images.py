"""Decode image files into one uint8 [N, C, H, W] array: the slow step of every folder-based dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from forde.config import DataError
from forde.data.base import Split
from forde.errors import one_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def read_rgb(path: Path) -> np.ndarray:
    """One image as uint8 [3, H, W]; grey, palette and RGBA files are converted to RGB. A file PIL cannot
    decode to the end (cut short, not an image) is a DataError naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a readable image ({one_line(err)}); replace or remove it") from None


def decode_images(paths: Sequence[Path], desc: str = "decoding images", chunk: int = 256) -> np.ndarray:
    """Decode `paths` (in order) into uint8 [N, 3, H, W], with a progress bar.

    Every image must have the size of the first one: models need one input shape. PIL releases the
    GIL while decoding, so threads working on chunks of files speed this up without copying arrays
    between processes.
    """
    if not paths:
        raise ValueError("no images to decode")
    first = read_rgb(paths[0])
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)

    def decode(start: int) -> int:
        end = min(start + chunk, len(paths))
        for i in range(start, end):
            image = read_rgb(paths[i])
            if image.shape != first.shape:
                raise DataError(
                    f"all images must share one size, but {paths[i]} is {image.shape[2]}x{image.shape[1]} while "
                    f"{paths[0]} is {first.shape[2]}x{first.shape[1]}; resize them to one size first"
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


def decode_splits(listed: dict[str, tuple[list[Path], list[int]]], desc: str) -> dict[str, Split]:
    """{split: (paths, labels)} -> {split: Split}, decoding every split in one pass (one size check, one bar)."""
    images = decode_images([p for paths, _ in listed.values() for p in paths], desc=desc)
    splits, start = {}, 0
    for split, (paths, labels) in listed.items():
        splits[split] = Split(
            torch.from_numpy(images[start : start + len(paths)]), torch.tensor(labels, dtype=torch.int64)
        )
        start += len(paths)
    return splits
