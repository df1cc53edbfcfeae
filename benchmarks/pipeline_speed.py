"""Training-input throughput: the on-device pipeline (DeviceLoader) vs a torchvision DataLoader.

Both read the same uint8 training images held in memory and produce the same kind of batch: random
crop (padding 4), horizontal flip, to float, normalise. The DataLoader does it per image in worker
processes, as torchvision's CIFAR examples do; the DeviceLoader does it per batch on the device.
No model runs: this is the input pipeline's ceiling. Epoch 1 of the DataLoader includes starting its
workers; epoch 2 reuses them (persistent workers).

    python benchmarks/pipeline_speed.py --root data [--dataset cifar10] [--batch-sizes 128 512] [--workers 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision.transforms as T
from PIL import Image
from report import write_report

from forde.config import DataConfig
from forde.data.pipeline import DeviceLoader
from forde.data.registry import load_dataset


class InMemoryImages(torch.utils.data.Dataset):
    """uint8 HWC images and labels in memory, transformed per item as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def epoch_rate(loader, device: torch.device, n: int) -> float:
    """Images per second of one pass over `loader`, batches landed on `device`."""
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/pipeline_speed.md")
    args = ap.parse_args()

    ds = load_dataset(DataConfig(name=args.dataset, root=args.root))
    train, n = ds.train, len(ds.train)
    size = train.inputs.shape[-1]
    transform = T.Compose(
        [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(ds.mean, ds.std)]
    )
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [
        f"{args.dataset} training set: {n:,} images {tuple(train.inputs.shape[1:])}, uint8 in memory.",
        "",
        "| device | loader | batch | epoch 1 (images/s) | epoch 2 (images/s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for device in devices:
        for bs in args.batch_sizes:
            dev_loader = DeviceLoader(train, bs, ds.mean, ds.std, device, shuffle=True, augment=True)
            rates = [epoch_rate(dev_loader, device, n) for _ in range(2)]
            rows.append(f"| {device.type} | DeviceLoader | {bs} | {rates[0]:,.0f} | {rates[1]:,.0f} |")
            tv_loader = torch.utils.data.DataLoader(
                InMemoryImages(train.inputs, train.labels, transform),
                batch_size=bs,
                shuffle=True,
                num_workers=args.workers,
                pin_memory=device.type == "cuda",
                persistent_workers=args.workers > 0,
            )
            tv_rates = [epoch_rate(tv_loader, device, n) for _ in range(2)]
            rows.append(
                f"| {device.type} | torchvision DataLoader, {args.workers} workers | {bs} | "
                f"{tv_rates[0]:,.0f} | {tv_rates[1]:,.0f} |"
            )
            rows.append(f"| {device.type} | speed-up (epoch 2) | {bs} | | {rates[1] / tv_rates[1]:.1f}x |")
            del tv_loader
    write_report(args.out, "Input pipeline speed", rows)


if __name__ == "__main__":
    main()
