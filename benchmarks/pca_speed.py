"""PCA timings: the plain float64 covariance vs the exact uint8 fast path, then eigh, at CIFAR scale
(real CIFAR-10, D = 3072) and Tiny-ImageNet scale (100k synthetic images, D = 12288).

The synthetic images are the CIFAR-10 training images upsampled to 64x64 plus their mirror images,
so their spectrum looks like natural images (eigh's speed depends on it). Without --full the 12288-dim
covariances are timed on --rows images and projected linearly in N (their cost is N * D^2); eigh is
always run at full size.

    python benchmarks/pca_speed.py --root data [--dataset cifar10] [--scales 3072 12288] [--rows 8192] [--full]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from report import write_report

from forde.config import DataConfig
from forde.data import pca
from forde.data.registry import load_dataset


def upsampled(images: torch.Tensor, size: int, chunk: int = 5000) -> torch.Tensor:
    """[N, C, h, w] uint8 -> [2N, C, size, size] uint8: bilinear upsampling, plus the mirrored copies."""
    out = torch.empty((2 * len(images), images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, len(images), chunk):
        up = F.interpolate(images[s : s + chunk].float(), size=(size, size), mode="bilinear", align_corners=False)
        out[s : s + chunk] = up.round_().clamp_(0, 255).to(torch.uint8)
    out[len(images) :] = out[: len(images)].flip(-1)
    return out


def compare(fast: torch.Tensor, plain: torch.Tensor) -> str:
    return f"max abs diff {(fast - plain).abs().max().item():.2e} (largest entry {plain.abs().max().item():.3g})"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class Table:
    """Markdown rows of timed steps: wall-clock and CPU seconds (all threads), measured or projected."""

    def __init__(self):
        self.rows = ["| step | D | N | wall s | CPU s | note |", "| --- | --- | --- | --- | --- | --- |"]

    def time(self, step: str, d: int, n: int, fn, *args, scale: float = 1.0, note=""):
        """Run fn(*args) and add a row. `scale` projects a run on n / scale inputs to n (cost linear in N);
        `note` is text, or a function of fn's result giving the text."""
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        notes = (
            [f"projected x{scale:.1f} from {n / scale:,.0f} images ({wall:.1f} s wall, {cpu:.1f} s CPU measured)"]
            if scale != 1.0
            else []
        )
        notes += [note(out) if callable(note) else note]
        self.rows.append(
            f"| {step} | {d} | {n:,} | {wall * scale:.1f} | {cpu * scale:.1f} | {'; '.join(filter(None, notes))} |"
        )
        return out


def covariances(table: Table, images: torch.Tensor, mean, std, n: int) -> torch.Tensor:
    """Time both covariance paths on `images` (standing for `n` images); return the fast path's result."""
    d, scale = images[0].numel(), n / len(images)
    plain = table.time("covariance, plain float64 GEMM", d, n, pca.covariance_float64, images, mean, std, scale=scale)
    return table.time(
        "covariance, exact float32 SYRK (fast path)",
        d,
        n,
        pca.covariance_uint8,
        images,
        std,
        scale=scale,
        note=lambda fast: f"fast vs plain: {compare(fast, plain)}",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--scales", nargs="+", type=int, default=[3072, 12288], choices=[3072, 12288])
    ap.add_argument("--rows", type=int, default=8192, help="images the 12288-dim covariances are timed on")
    ap.add_argument("--full", action="store_true", help="also run the fast 12288-dim covariance on all 100k images")
    ap.add_argument("--out", default="benchmarks/results/pca_speed.md")
    args = ap.parse_args()

    ds = load_dataset(DataConfig(name=args.dataset, root=args.root))
    mean, std = ds.mean, ds.std
    table = Table()
    for scale in args.scales:
        x = ds.train.inputs if scale == 3072 else upsampled(ds.train.inputs, 64)
        d, n = x[0].numel(), len(x)
        table.time("fingerprint (SHA-1 of the inputs)", d, n, pca.fingerprint, x, mean, std)
        cov = covariances(table, x[: args.rows] if scale == 12288 else x, mean, std, n)
        if scale == 12288 and args.full:
            cov = table.time(
                "covariance, exact float32 SYRK (fast path)",
                d,
                n,
                pca.covariance_uint8,
                x,
                std,
                note="measured on all images",
            )
        table.time(
            "eigh (float64, torch.linalg.eigh)",
            d,
            n,
            pca.pca_from_covariance,
            cov,
            note=f"process peak memory before it: {peak_gib():.1f} GiB",
        )
        del x, cov
    table.rows += ["", f"Peak memory of the process: {peak_gib():.1f} GiB."]
    write_report(args.out, "PCA speed", table.rows)


if __name__ == "__main__":
    main()
