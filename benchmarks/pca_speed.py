"""PCA timings: the plain float64 covariance vs the exact uint8 fast path, then eigh, at CIFAR scale
(real CIFAR-10, D = 3072) and Tiny-ImageNet scale (100k synthetic images, D = 12288).

The synthetic images are the CIFAR-10 training images upsampled to 64x64 plus their mirror images,
so their spectrum looks like natural images (eigh's speed depends on it). Without --full the 12288-dim
covariances are timed on --rows images and projected linearly in N (their cost is N * D^2); eigh is
always run at full size.

    python benchmarks/pca_speed.py --root data [--dataset cifar10] [--rows 8192] [--full]
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


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def upsampled(images: torch.Tensor, size: int, chunk: int = 5000) -> torch.Tensor:
    """[N, C, h, w] uint8 -> [2N, C, size, size] uint8: bilinear upsampling, plus the mirrored copies."""
    out = torch.empty((2 * len(images), images.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, len(images), chunk):
        up = F.interpolate(images[s:s + chunk].float(), size=(size, size), mode="bilinear", align_corners=False)
        out[s:s + chunk] = up.round_().clamp_(0, 255).to(torch.uint8)
    out[len(images):] = out[:len(images)].flip(-1)
    return out


def compare(fast: torch.Tensor, plain: torch.Tensor) -> str:
    return f"max abs diff {(fast - plain).abs().max().item():.2e} (largest entry {plain.abs().max().item():.3g})"


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--rows", type=int, default=8192, help="images the 12288-dim covariances are timed on")
    ap.add_argument("--full", action="store_true", help="run the fast 12288-dim covariance on all 100k images")
    ap.add_argument("--out", default="benchmarks/results/pca_speed.md")
    args = ap.parse_args()

    ds = load_dataset(DataConfig(name=args.dataset, root=args.root))
    x, mean, std = ds.train.inputs, ds.mean, ds.std
    rows = ["| step | D | N | seconds | note |", "| --- | --- | --- | --- | --- |"]
    add = lambda step, d, n, sec, note="": rows.append(f"| {step} | {d} | {n:,} | {sec:.1f} | {note} |")

    d, n = x[0].numel(), len(x)
    _, sec = timed(pca.fingerprint, x, mean, std)
    add("fingerprint (SHA-1 of the inputs)", d, n, sec)
    plain, sec_plain = timed(pca.covariance_float64, x, mean, std)
    add("covariance, plain float64 GEMM", d, n, sec_plain)
    fast, sec_fast = timed(pca.covariance_uint8, x, std)
    add("covariance, exact float32 SYRK (fast path)", d, n, sec_fast,
        f"{sec_plain / sec_fast:.1f}x faster; {compare(fast, plain)}")
    ref, _ = timed(pca.pca_from_covariance, plain)
    result, sec = timed(pca.pca_from_covariance, fast)
    rel = ((result.eigenvalues - ref.eigenvalues).abs() / ref.eigenvalues[0]).max().item()
    add("eigh (float64, torch.linalg.eigh)", d, n, sec, f"eigenvalues of the two paths differ by <= {rel:.1e} of the largest")
    del plain, fast, ref, result

    big = upsampled(x, 64)
    d, n = big[0].numel(), len(big)
    _, sec = timed(pca.fingerprint, big, mean, std)
    add("fingerprint (SHA-1 of the inputs)", d, n, sec)
    part = big[:args.rows]
    scale = n / len(part)
    plain, sec_plain = timed(pca.covariance_float64, part, mean, std)
    add("covariance, plain float64 GEMM", d, n, sec_plain * scale, f"projected from {len(part):,} images ({sec_plain:.1f} s)")
    fast, sec_fast = timed(pca.covariance_uint8, part, std)
    add("covariance, exact float32 SYRK (fast path)", d, n, sec_fast * scale,
        f"projected from {len(part):,} images ({sec_fast:.1f} s); {sec_plain / sec_fast:.1f}x faster; {compare(fast, plain)}")
    del plain
    if args.full:
        fast, sec = timed(pca.covariance_uint8, big, std)
        add("covariance, exact float32 SYRK (fast path)", d, n, sec, "measured on all images")
    result, sec = timed(pca.pca_from_covariance, fast)
    add("eigh (float64, torch.linalg.eigh)", d, n, sec, f"peak memory of the process so far {peak_gib():.1f} GiB")
    write_report(args.out, "PCA speed", rows)


if __name__ == "__main__":
    main()
