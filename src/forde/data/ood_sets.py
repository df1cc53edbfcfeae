"""Out-of-distribution test sets, as `eval.ood` names them: images the ensemble should find unfamiliar, each given
at the in-distribution test set's shape (resized with antialiasing, channels converted) so that the same networks
score them.

    gaussian_noise  per-channel normal noise with the training images' mean and std     far; needs no download
    uniform_noise   uniform noise over 0..255                                             far; needs no download
    svhn            SVHN's test split (torchvision's test_32x32.mat in <data.root>/svhn)   far
    cifar10         CIFAR-10's test split                                                 near for CIFAR-100
    cifar100        CIFAR-100's test split                                                near for CIFAR-10
    tinyimagenet    Tiny-ImageNet's validation images                                     near

A set that is missing is one line before training, naming the file, where to get it and the command that does.
The noise sets hold as many images as the in-distribution test set (at most 10,000), drawn with a fixed seed:
every run of a dataset is scored on the same pixels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from forde.config import ConfigError, DataConfig, MissingDataError, TrainConfig
from forde.data.base import Dataset
from forde.data.ood_names import NOISE, OOD_SETS
from forde.errors import DataError, one_line

log = logging.getLogger(__name__)

NOISE_SEED = 0
MAX_NOISE_IMAGES = 10_000
SVHN_FILE = Path("svhn") / "test_32x32.mat"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"  # torchvision's source of that file


@dataclass
class OODSet:
    """One OOD set to score; its images are read when it is evaluated (one set in memory at a time)."""

    name: str
    load: Callable[[], torch.Tensor]  # uint8 [N, C, H, W] at the in-distribution shape


def noise_images(name: str, dataset: Dataset) -> torch.Tensor:
    """The noise set `name` at the dataset's test shape, seeded by NOISE_SEED."""
    g = torch.Generator().manual_seed(NOISE_SEED)
    n = min(len(dataset.full.test), MAX_NOISE_IMAGES)
    shape = (n, *dataset.input_shape)
    if name == "uniform_noise":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    mean = torch.tensor(dataset.mean, dtype=torch.float64).view(1, -1, 1, 1) * 255
    std = torch.tensor(dataset.std, dtype=torch.float64).view(1, -1, 1, 1) * 255
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).round().clamp(0, 255).to(torch.uint8)


def fit_to(images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 [N, C, H, W] at `shape` (C, H, W): channels converted (grey repeated; colour to luminance, ITU-R 601
    as Pillow's "L"), resized bilinearly with antialiasing."""
    channels, height, width = shape
    x = images.double()
    if x.shape[1] != channels:
        if channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            x = x.expand(-1, channels, -1, -1)
    if x.shape[2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def read_svhn(root: Path) -> torch.Tensor:
    """SVHN's test images from torchvision's file (a MATLAB file: arrays only, nothing is run)."""
    from scipy.io import loadmat

    path = root / SVHN_FILE
    try:
        images = loadmat(path, variable_names=["X"])["X"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is unreadable ({one_line(err)}); download {SVHN_URL} there again") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != 3:
        raise DataError(f"{path}: X is {images.dtype} {images.shape}, expected uint8 [32, 32, 3, N]; download it again")
    return torch.from_numpy(np.ascontiguousarray(images.transpose(3, 2, 0, 1)))


def _missing(name: str, root: Path) -> str | None:
    """Why the set `name` cannot be read, with where to get it; None when it is there."""
    if name == "svhn":
        if (root / SVHN_FILE).is_file():
            return None
        return (
            f"svhn: the SVHN test split is not at {root / SVHN_FILE}; download {SVHN_URL} there (or set "
            "data.download=true once, on a machine with internet access: torchvision fetches it)"
        )
    from forde.data.cifar import RELEASE_NAMES, release_of
    from forde.data.imagefolder import imported_dir, is_imported
    from forde.data.tinyimagenet import FOLDER

    folder = root / (release_of(name).base_folder if name in RELEASE_NAMES else FOLDER)
    if folder.is_dir() or is_imported(root, name):
        return None
    return (
        f"{name}: neither its release files at {folder} nor an imported folder at {imported_dir(root, name)}; set "
        f"data.download=true once on a machine with internet access, or import an ImageFolder tree of it with "
        f"`forde data import-folder SRC {name}`"
    )


def ood_sets(cfg: TrainConfig, dataset: Dataset) -> list[OODSet]:
    """The OOD sets `eval.ood` names for this dataset (the in-distribution set itself left out, with a line saying
    so), each checked to be on disk; with data.download, a missing one is downloaded here."""
    if dataset.name in cfg.eval.ood:
        log.info("eval.ood: %s is the training data itself; it is not scored as out-of-distribution", dataset.name)
    names = [n for n in cfg.eval.ood if n != dataset.name]
    unknown = [n for n in names if n not in OOD_SETS]
    if unknown:
        raise ConfigError(f"eval.ood: unknown set(s) {unknown}; known: {', '.join(OOD_SETS)} (or [] for none)")
    root = Path(cfg.data.root)
    if cfg.data.download:
        for name in names:
            if name not in NOISE and _missing(name, root):
                _download(name, dataset, cfg.data)
    problems = [p for p in (_missing(n, root) for n in names if n not in NOISE) if p]
    if problems:
        raise MissingDataError(
            f"eval.ood: {len(problems)} set(s) missing in data.root = {root}: " + "; ".join(problems)
        )
    return [OODSet(name, functools.partial(load_ood_images, name, dataset, cfg.data)) for name in names]


def _download(name: str, dataset: Dataset, data: DataConfig) -> None:
    """Fetch a missing OOD set now (before any training), one line if the network or the file fails."""
    log.info("eval.ood: downloading %s into %s", name, data.root)
    try:
        if name == "svhn":
            from torchvision.datasets import SVHN

            SVHN(str(Path(data.root) / SVHN_FILE.parent), split="test", download=True)
        else:
            load_ood_images(name, dataset, data)
    except (ConfigError, DataError):
        raise
    except Exception as err:  # urllib's, torchvision's and the archive's errors alike
        raise DataError(
            f"eval.ood: downloading {name} into {data.root} failed ({one_line(err)}); download it on a machine with "
            "internet access (data.download=true there) and copy data.root here, or drop it from eval.ood"
        ) from None


def check_ood_sets(cfg: TrainConfig, dataset: Dataset) -> list[OODSet]:
    """`ood_sets`, and every set read once: a damaged file is one line before training, not a failure after it."""
    sets = ood_sets(cfg, dataset)
    for s in sets:
        if s.name in NOISE:
            continue
        try:
            images = s.load()
        except (ConfigError, DataError):
            raise
        except Exception as err:
            raise DataError(f"eval.ood: the set {s.name} in {cfg.data.root} is unreadable ({one_line(err)})") from None
        log.debug("eval.ood: %s holds %d images", s.name, len(images))
    return sets


def load_ood_images(name: str, dataset: Dataset, data: DataConfig) -> torch.Tensor:
    """The images of the OOD set `name` at the dataset's shape."""
    if name in NOISE:
        return noise_images(name, dataset)
    if name == "svhn":
        images = read_svhn(Path(data.root))
    else:
        from forde.data.registry import load_dataset

        images = load_dataset(DataConfig(name=name, root=data.root, download=data.download)).test.inputs
    return fit_to(images, dataset.input_shape)
