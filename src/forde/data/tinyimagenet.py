"""Tiny-ImageNet-200 from its release layout; the 110k JPEGs are decoded once into an array cache.

Layout: <root>/tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with
val/val_annotations.txt. The labelled val set serves as the test set (the test images have no labels).
Class index = position of the wnid in the sorted wnids. Delete the cache folder to decode again.
"""

from __future__ import annotations

from pathlib import Path

from forde.config import DataConfig, DataError
from forde.data.base import Dataset
from forde.data.imagefolder import missing_data_error
from forde.data.images import decode_splits, is_image_file
from forde.data.store import is_store, load_store, save_store
from forde.errors import one_line
from forde.names import is_path_component

FOLDER = "tiny-imagenet-200"
CACHE = "forde-cache"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def list_release(folder: Path) -> tuple[dict[str, tuple[list[Path], list[int]]], list[str]]:
    """{split: (paths, labels)} in a fixed order (sorted wnids, sorted file names), and the sorted wnids.

    The listing files are checked as they are read: every wnid and file name is a plain file name inside the
    release folder, every class has its training images, every validation image exists."""
    fix = f"unpack the release again (data.download=true, or {URL})"
    wnids_file, annotations = folder / "wnids.txt", folder / "val" / "val_annotations.txt"
    wnids = sorted({line.strip() for line in _read_text(wnids_file, fix).splitlines() if line.strip()})
    if not wnids:
        raise DataError(f"{wnids_file} lists no wnids; {fix}")
    bad = [w for w in wnids if not is_path_component(w)]
    if bad:
        raise DataError(f"{wnids_file}: wnid {bad[0]!r} is not a plain folder name; {fix}")
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        images = folder / "train" / w / "images"
        files = sorted(p for p in images.iterdir() if is_image_file(p)) if images.is_dir() else []
        if not files:
            raise DataError(f"{images} holds no images, but {wnids_file} lists {w}; {fix}")
        train += [(p, index[w]) for p in files]
    test = []
    for number, line in enumerate(_read_text(annotations, fix).splitlines(), start=1):
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in index:
            raise DataError(f"{annotations} line {number}: wnid {fields[1]!r} is not in wnids.txt; {fix}")
        image = folder / "val" / "images" / fields[0]
        if not (is_path_component(fields[0]) and image.is_file()):
            raise DataError(f"{annotations} line {number}: no image {image}; {fix}")
        test.append((image, index[fields[1]]))
    if not test:
        raise DataError(f"{annotations} lists no validation images; {fix}")
    test.sort()
    listed = {
        split: ([p for p, _ in pairs], [y for _, y in pairs]) for split, pairs in (("train", train), ("test", test))
    }
    return listed, wnids


def _read_text(path: Path, fix: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is unreadable ({one_line(err)}); {fix}") from None


def load_tinyimagenet(cfg: DataConfig) -> Dataset:
    folder = Path(cfg.root) / FOLDER
    cache = folder / CACHE
    if not is_store(cache):
        if not (folder / "wnids.txt").is_file():
            if not cfg.download:
                raise missing_data_error(cfg.name, folder, cfg.root)
            from torchvision.datasets.utils import download_and_extract_archive  # seconds to import: only here

            download_and_extract_archive(URL, cfg.root, md5=MD5)
        listed, wnids = list_release(folder)
        save_store(
            cache, decode_splits(listed, desc="decoding Tiny-ImageNet (once)", max_pixels=cfg.max_image_pixels), wnids
        )
    return load_store(cache, cfg.name)
