"""The on-device input pipeline against a plain per-image torchvision reference, and its seeded stream."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from conftest import CUDA, devices
from forde.data.base import Split
from forde.data.pipeline import DeviceLoader, crop_flip, eval_batches, normalize, sample_crop_flip

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int = 4) -> torch.Tensor:
    """torchvision's RandomCrop(padding=pad) + RandomHorizontalFlip + ToTensor + Normalize at given draws."""
    h, w = image.shape[1:]
    pil = TF.pad(TF.to_pil_image(image), pad, fill=0)
    pil = TF.crop(pil, dy, dx, h, w)
    if flip:
        pil = TF.hflip(pil)
    return TF.normalize(TF.to_tensor(pil), MEAN, STD)


def reference_batch(images: torch.Tensor, dy, dx, flip) -> torch.Tensor:
    return torch.stack([reference(im, int(a), int(b), bool(f)) for im, a, b, f in zip(images, dy, dx, flip)])


def _mean_std(device="cpu"):
    return torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)


def test_crop_flip_matches_torchvision_at_extreme_offsets():
    images = _images(6)
    dy, dx = torch.tensor([0, 8, 0, 8, 4, 3]), torch.tensor([0, 8, 8, 0, 4, 7])
    flip = torch.tensor([False, True, True, False, True, False])
    out = normalize(crop_flip(images, dy, dx, flip, pad=4), *_mean_std())
    assert torch.equal(out, reference_batch(images, dy, dx, flip))


def test_crop_flip_with_sampled_draws_matches_torchvision():
    images = _images(64, seed=1)
    dy, dx, flip = sample_crop_flip(64, 4, torch.Generator().manual_seed(3))
    out = normalize(crop_flip(images, dy, dx, flip, pad=4), *_mean_std())
    assert torch.equal(out, reference_batch(images, dy, dx, flip))


def test_sample_crop_flip_covers_every_offset_and_both_flips():
    dy, dx, flip = sample_crop_flip(4000, 4, torch.Generator().manual_seed(0))
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9))
    assert 0.45 < flip.float().mean().item() < 0.55


def _loader(n=50, batch=16, seed=5, device="cpu", **kw) -> DeviceLoader:
    split = Split(_images(n, seed=2), torch.arange(n))
    opts = dict(shuffle=True, augment=True) | kw
    return DeviceLoader(split, batch, MEAN, STD, device, seed=seed, **opts)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.cpu(), y.cpu()) for x, y in loader]


@pytest.mark.parametrize("device", devices())
def test_device_loader_matches_per_image_reference(device):
    """Two epochs of shuffled, augmented, normalised batches equal the reference built from the same draws."""
    loader = _loader(device=device)
    gen = torch.Generator(device=device).manual_seed(5)
    images = loader.inputs.cpu()
    for _ in range(2):
        order = torch.randperm(50, generator=gen, device=device)
        batches = _epoch(loader)
        assert [len(y) for _, y in batches] == [16, 16, 16, 2]
        for i, (x, y) in enumerate(batches):
            idx = order[i * 16 : (i + 1) * 16]
            dy, dx, flip = (t.cpu() for t in sample_crop_flip(len(idx), 4, gen))
            assert torch.equal(y, idx.cpu())  # labels are the indices
            assert torch.equal(x, reference_batch(images[idx.cpu()], dy, dx, flip))


def test_shuffle_covers_every_index_once_per_epoch():
    loader = _loader(n=103, batch=10)
    first, second = (torch.cat([y for _, y in _epoch(loader)]) for _ in range(2))
    assert first.sort().values.tolist() == second.sort().values.tolist() == list(range(103))
    assert not torch.equal(first, second)
    dropped = torch.cat([y for _, y in _loader(n=103, batch=10, drop_last=True)])
    assert len(dropped) == 100 and len(set(dropped.tolist())) == 100


def test_same_seed_same_batches_other_seed_others():
    a, b, c = _epoch(_loader(seed=1)), _epoch(_loader(seed=1)), _epoch(_loader(seed=2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])


def test_state_dict_round_trip_resumes_the_stream():
    loader = _loader(seed=7)
    _epoch(loader)
    state = loader.state_dict()
    expected = _epoch(loader)  # what the uninterrupted run draws next
    resumed = _loader(seed=123)  # a fresh process, whatever its seed
    resumed.load_state_dict(state)
    got = _epoch(resumed)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(expected, got))


def test_unshuffled_unaugmented_loader_is_plain_normalisation():
    loader = _loader(n=20, batch=8, shuffle=False, augment=False)
    x = torch.cat([x for x, _ in loader])
    assert torch.equal(x, normalize(loader.inputs, *_mean_std()))


def test_eval_batches_keep_order_and_cover_the_split():
    split = Split(_images(25, seed=4), torch.arange(25))
    batches = list(eval_batches(split, 10, MEAN, STD, "cpu"))
    assert [len(y) for _, y in batches] == [10, 10, 5]
    assert torch.equal(torch.cat([y for _, y in batches]), split.labels)
    expected = torch.stack([TF.normalize(TF.to_tensor(TF.to_pil_image(im)), MEAN, STD) for im in split.inputs])
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)


@CUDA
def test_cuda_pipeline_gives_the_cpu_batches():
    """The same draws give the same batches on CUDA as on the CPU: crop, flip, normalisation and evaluation
    batches. (The generators differ between devices, so the draws are made once and shared.)"""
    images = _images(64, seed=3)
    dy, dx, flip = sample_crop_flip(64, 4, torch.Generator().manual_seed(4))

    def on(device):
        return normalize(
            crop_flip(images.to(device), dy.to(device), dx.to(device), flip.to(device), pad=4), *_mean_std(device)
        )

    torch.testing.assert_close(on("cuda").cpu(), on("cpu"), rtol=0, atol=1e-6)
    split = Split(images, torch.arange(64))
    for (xc, yc), (xg, yg) in zip(
        eval_batches(split, 20, MEAN, STD, "cpu"), eval_batches(split, 20, MEAN, STD, "cuda")
    ):
        assert xg.is_cuda and torch.equal(yg.cpu(), yc)
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
    cpu_loader = _epoch(_loader(n=64, shuffle=False, augment=False))
    for (xg, yg), (xc, yc) in zip(_epoch(_loader(n=64, device="cuda", shuffle=False, augment=False)), cpu_loader):
        assert torch.equal(yg, yc)
        torch.testing.assert_close(xg, xc, rtol=0, atol=1e-6)
