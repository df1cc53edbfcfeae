"""Batches from data held on the training device: seeded shuffling, crop/flip and normalisation in batch.

No DataLoader workers: the whole training set lives on the device as uint8 and every augmentation is
a handful of tensor ops over the batch, so the same code serves CPU tests and GPU runs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from forde.data.base import Split


def normalize(
    inputs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 images -> (x/255 - mean)/std per channel; float features -> (x - mean)/std; computed in `dtype`."""
    mean, std = mean.to(dtype), std.to(dtype)
    if inputs.dtype == torch.uint8:
        x = inputs.to(dtype).div_(255.0)
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        return x.sub_(mean.view(shape)).div_(std.view(shape))
    return (inputs.to(dtype) - mean) / std


def sample_crop_flip(n: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets in [0, 2*pad] and flip flags, drawn on the generator's device."""
    dev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    return dy, dx, flip


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad`, take each sample's HxW window at (dy, dx), mirror where `flip`: torchvision's
    RandomCrop(padding=pad) + RandomHorizontalFlip, for a whole [B, C, H, W] batch at once."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # [B,1,H,1]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [B,W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # [B,1,1,W]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


class DeviceLoader:
    """Iterates (inputs, labels) batches over a Split already moved to `device`.

    `state_dict()` holds the generator state, so a run resumed at an epoch boundary draws exactly the
    batches it would have drawn without the interruption.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean,
        std,
        device: torch.device | str,
        *,
        shuffle: bool,
        augment: bool,
        seed: int = 0,
        pad: int = 4,
        drop_last: bool = False,
    ):
        self.device = torch.device(device)
        self.inputs = split.inputs.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.pad, self.drop_last = batch_size, shuffle, pad, drop_last
        self.augment = augment and self.inputs.dtype == torch.uint8 and self.inputs.dim() == 4
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=self.generator, device=self.device)
            if self.shuffle
            else torch.arange(n, device=self.device)
        )
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.inputs[idx]
            if self.augment:
                x = crop_flip(x, *sample_crop_flip(len(idx), self.pad, self.generator), pad=self.pad)
            yield normalize(x, self.mean, self.std), self.labels[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def eval_batches(
    split: Split, batch_size: int, mean, std, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream a split to the device in order, batch by batch (the split itself may stay on the CPU)."""
    device = torch.device(device)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
    for start in range(0, len(split), batch_size):
        x = split.inputs[start : start + batch_size].to(device, non_blocking=True)
        y = split.labels[start : start + batch_size].to(device, non_blocking=True)
        yield normalize(x, mean_t, std_t), y
