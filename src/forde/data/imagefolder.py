"""Import any ImageFolder tree (SRC/{train,test[,val]}/<class>/<image>) as uint8 arrays under <root>/<name>/.

After `import_folder(src, name, root)`, `data.name=<name>` loads it: decoding happens once, here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from forde.config import ConfigError, DataError, MissingDataError
from forde.config.schema import MAX_IMAGE_PIXELS
from forde.data.base import Dataset, check_classes
from forde.data.images import IMAGE_SUFFIXES, decode_splits, is_image_file
from forde.data.store import is_store, load_store, save_store

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED = ("pca", "digits")  # other things that live under data.root, and the bundled digits (never read from it)
LAYOUT = "SRC/train/<class>/*, SRC/test/<class>/* and optionally SRC/val/<class>/*"


def imported_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name


def is_imported(root: str | Path, name: str) -> bool:
    return is_store(imported_dir(root, name))


def imported_names(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and is_store(d))


def missing_data_error(name: str, release: Path, root: str | Path) -> MissingDataError:
    """The error for a built-in dataset that is not on disk: where it was looked for, and both fixes."""
    return MissingDataError(
        f"data.name = {name!r}: found neither the release files at {release} nor an imported folder at "
        f"{imported_dir(root, name)}. Either set data.download=true on a machine with internet access (it "
        f"downloads into data.root = {root}), or decode an ImageFolder tree of it once with "
        f"`forde data import-folder SRC {name}` ({LAYOUT})."
    )


def load_imported(root: str | Path, name: str) -> Dataset:
    return load_store(imported_dir(root, name), name)


def _subdirs(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_split(split_dir: Path, class_index: dict[str, int], allow_empty: bool) -> tuple[list[Path], list[int]]:
    """Image paths of one split (sorted class dirs, sorted file names within) and their labels."""
    paths, labels = [], []
    for cls in _subdirs(split_dir):
        if cls not in class_index:
            raise DataError(
                f"{split_dir / cls}: class '{cls}' has no folder in the train split; add "
                f"{split_dir.parent / 'train' / cls} with its training images, or remove {split_dir / cls}"
            )
        files = sorted(p for p in (split_dir / cls).iterdir() if is_image_file(p))
        if not files and not allow_empty:
            raise DataError(
                f"{split_dir / cls} holds no images (files ending in {', '.join(IMAGE_SUFFIXES)}); add "
                "them, remove the folder, or pass --allow-empty-classes to keep the class without images"
            )
        if not files:
            log.warning(
                "%s holds no images; its class is kept without %s images (--allow-empty-classes)",
                split_dir / cls,
                split_dir.name,
            )
        paths += files
        labels += [class_index[cls]] * len(files)
    if not paths:
        raise DataError(f"{split_dir} holds no images; expected {LAYOUT}")
    return paths, labels


def import_folder(
    src: str | Path,
    name: str,
    root: str | Path,
    allow_empty_classes: bool = False,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Path:
    """Decode an ImageFolder tree into <root>/<name>/ and return that path. Class index = position of
    the class folder in the sorted train class folders; all images must share one size, none over `max_pixels`.
    A class folder without images is refused unless `allow_empty_classes` (a model would silently learn fewer
    classes); at least two classes must have images in both train and test."""
    if not NAME_PATTERN.fullmatch(name) or name in RESERVED:
        raise ConfigError(
            f"dataset name {name!r}: use letters, digits, '_', '.', '-' (not starting with a "
            f"symbol), and not {', '.join(RESERVED)}"
        )
    src = Path(src)
    for required in ("train", "test"):
        if not (src / required).is_dir():
            raise MissingDataError(f"{src / required} is not a folder; import-folder expects {LAYOUT}")
    class_names = _subdirs(src / "train")
    class_index = {c: i for i, c in enumerate(class_names)}
    listed = {
        s: _list_split(src / s, class_index, allow_empty_classes)
        for s in ("train", "val", "test")
        if (src / s).is_dir()
    }
    check_classes({split: labels for split, (_, labels) in listed.items()}, class_names, f"{src} ({LAYOUT})")
    splits = decode_splits(listed, desc=f"importing {name}", max_pixels=max_pixels)
    dest = imported_dir(root, name)
    save_store(dest, splits, class_names)
    sizes = ", ".join(f"{split} {len(data)}" for split, data in splits.items())
    log.info(
        "imported %s as '%s' into %s: %s, %d classes, images %s",
        src,
        name,
        dest,
        sizes,
        len(class_names),
        tuple(splits["train"].inputs.shape[1:]),
    )
    return dest
