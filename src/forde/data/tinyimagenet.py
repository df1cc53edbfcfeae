"""Tiny-ImageNet-200 from its release layout; the 110k JPEGs are decoded once into an array cache.

Layout: <root>/tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with
val/val_annotations.txt. The labelled val set serves as the test set (the test images have no labels).
Class index = position of the wnid in the sorted wnids. Delete the cache folder to decode again.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets.utils import download_and_extract_archive

from forde.config import DataConfig
from forde.data.base import Dataset
from forde.data.imagefolder import missing_data_error
from forde.data.images import decode_splits, is_image_file
from forde.data.store import is_store, load_store, save_store

FOLDER = "tiny-imagenet-200"
CACHE = "forde-cache"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def list_release(folder: Path) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """{split: (paths, labels)} in a fixed order (sorted wnids, sorted file names), and the sorted wnids."""
    wnids = sorted({line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    train = [(p, index[w]) for w in wnids for p in sorted((folder / "train" / w / "images").iterdir()) if is_image_file(p)]
    test = []
    for line in (folder / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in index:
            raise ValueError(f"{folder / 'val' / 'val_annotations.txt'}: wnid {fields[1]!r} is not in wnids.txt")
        test.append((folder / "val" / "images" / fields[0], index[fields[1]]))
    test.sort()
    listed = {split: ([p for p, _ in pairs], [y for _, y in pairs]) for split, pairs in (("train", train), ("test", test))}
    return listed, wnids


def load_tinyimagenet(cfg: DataConfig) -> Dataset:
    folder = Path(cfg.root) / FOLDER
    cache = folder / CACHE
    if not is_store(cache):
        if not (folder / "wnids.txt").is_file():
            if not cfg.download:
                raise missing_data_error(cfg.name, folder, cfg.root)
            download_and_extract_archive(URL, cfg.root, md5=MD5)
        listed, wnids = list_release(folder)
        save_store(cache, decode_splits(listed, desc="decoding Tiny-ImageNet (once)"), wnids)
    return load_store(cache, cfg.name)
