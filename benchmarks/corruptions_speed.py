"""Corruption speed on real CIFAR-10 test images: images/s per corruption for both parameter tables (one process;
the "tiny" table runs on the images upsampled to 64x64), then the wall time of generating the whole CIFAR-10-C
(19 corruptions x 5 severities x the 10,000 test images) with worker processes.

--images is a CIFAR-10 test set as an ImageFolder of image files (<dir>/<class>/<file>). Without --full only
--fraction of the test images go through the generation and its time is scaled up, reported as a projection.

    python benchmarks/corruptions_speed.py --images <cifar10 test folder> [--n 500] [--workers 2] [--full]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import scipy
import skimage
from PIL import Image
from report import write_report

from forde.data.corrupted_sets import generate_corrupted_set
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES
from forde.data.corruptions import corrupt

RESULTS = Path(__file__).parent / "results" / "corruptions_speed.md"


def load_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 32, 32, 3] and labels, class = position of the class dir in sorted order."""
    images, labels = [], []
    for label, class_dir in enumerate(sorted(d for d in root.iterdir() if d.is_dir())):
        for path in sorted(class_dir.iterdir()):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def upsample(images: np.ndarray, side: int) -> np.ndarray:
    """PIL bilinear, as torchvision's Resize gave the Tiny-ImageNet-C sources."""
    return np.stack([np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR)) for img in images])


def images_per_second(images: np.ndarray, name: str, table: str) -> float:
    start = time.perf_counter()
    for severity in SEVERITIES:
        corrupt(images, name, severity, np.random.default_rng(severity), table)
    return len(SEVERITIES) * len(images) / (time.perf_counter() - start)


def time_generation(images: np.ndarray, labels: np.ndarray, workers: int, out: Path | None) -> float:
    """Seconds to write the whole set (npy layout) for these images; the output is deleted unless --out."""
    target = out or Path(tempfile.mkdtemp(prefix="cifar10-c-"))
    start = time.perf_counter()
    generate_corrupted_set(images.transpose(0, 3, 1, 2), labels, target, workers=workers)
    seconds = time.perf_counter() - start
    n = len(images) * len(SEVERITIES)
    assert all(np.load(target / f"{c}.npy", mmap_mode="r").shape == (n, 32, 32, 3) for c in CORRUPTIONS)
    if out is None:
        shutil.rmtree(target)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="CIFAR-10 test set as an ImageFolder")
    parser.add_argument("--n", type=int, default=500, help="images per corruption and severity for the rates")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="generate the whole CIFAR-10-C for real")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the test set without --full")
    parser.add_argument("--out", type=Path, help="keep the generated set here (default: temporary, deleted)")
    args = parser.parse_args()

    images, labels = load_image_folder(args.images)
    sample = images[np.linspace(0, len(images) - 1, args.n).astype(int)]
    cv2.setNumThreads(1)  # one core per process, as in the generation workers
    rows = [
        "## Images per second, one process",
        "",
        f"{args.n} test images x 5 severities per cell; the tiny table runs on them upsampled to 64x64.",
        "",
        "| corruption | cifar 32x32 (img/s) | tiny 64x64 (img/s) |",
        "|---|---:|---:|",
    ]
    seconds = {"cifar": 0.0, "tiny": 0.0}  # one-core time of a 10,000-image set at these rates
    for name in CORRUPTIONS:
        rates = {
            "cifar": images_per_second(sample, name, "cifar"),
            "tiny": images_per_second(upsample(sample, 64), name, "tiny"),
        }
        for table, rate in rates.items():
            seconds[table] += len(SEVERITIES) * len(images) / rate
        rows.append(f"| {name} | {rates['cifar']:,.0f} | {rates['tiny']:,.0f} |")
        print(rows[-1], flush=True)
    rows += [
        "",
        f"One-core time for all 19 x 5 x {len(images):,} images at these rates (projection): "
        f"cifar {seconds['cifar'] / 60:.1f} min, tiny {seconds['tiny'] / 60:.1f} min.",
        "",
    ]

    rows += ["## Whole CIFAR-10-C generation", ""]
    total = len(CORRUPTIONS) * len(SEVERITIES) * len(images)
    if args.full:
        wall = time_generation(images, labels, args.workers, args.out)
        rows.append(
            f"Measured: {total:,} images (19 x 5 x {len(images):,}, npy layout) in {wall / 60:.1f} min "
            f"wall with {args.workers} worker processes ({total / wall:,.0f} images/s)."
        )
    else:
        part = int(round(args.fraction * len(images)))
        wall = time_generation(images[:part], labels[:part], args.workers, args.out)
        rows.append(
            f"Measured on {part:,} of the {len(images):,} test images: {wall:.0f} s with {args.workers} "
            f"workers. Projection for the whole set (linear in images): {wall * len(images) / part / 60:.1f} "
            f"min."
        )
    write_report(
        RESULTS,
        "Corruption speed",
        rows,
        software=f", NumPy {np.__version__}, SciPy {scipy.__version__}, scikit-image {skimage.__version__}, "
        f"OpenCV {cv2.__version__}, Pillow {Image.__version__}",
    )


if __name__ == "__main__":
    main()
