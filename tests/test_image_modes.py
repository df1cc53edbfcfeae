"""Every image mode Pillow reads becomes uint8 RGB at its real range (forde.data.images.rgb_pixels), each checked here
against a conversion written out independently in NumPy; what cannot be converted right is one line naming the
file and the mode. Also: images sized from their headers before decoding, and stores larger than memory."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import forde.data.images as images
from forde.config import DataConfig, DataError
from forde.data.images import decode_images, read_rgb, rgb_pixels
from forde.data.registry import load_dataset
from forde.data.store import save_store
from test_datasets import write_folder

RNG = np.random.default_rng(0)
H, W = 5, 7


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[None].astype(np.uint8), 3, axis=0)


def saved(tmp_path: Path, img: Image.Image, name: str) -> np.ndarray:
    path = tmp_path / name
    img.save(path)
    return read_rgb(path)


def test_8_bit_modes(tmp_path):
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    grey = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    bits = RNG.random((H, W)) > 0.5
    assert np.array_equal(saved(tmp_path, Image.fromarray(rgb, "RGB"), "rgb.png"), rgb.transpose(2, 0, 1))
    rgba = np.dstack([rgb, alpha])
    assert np.array_equal(saved(tmp_path, Image.fromarray(rgba, "RGBA"), "rgba.png"), rgb.transpose(2, 0, 1))
    assert np.array_equal(saved(tmp_path, Image.fromarray(grey, "L"), "l.png"), grey3(grey))
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    assert np.array_equal(saved(tmp_path, la, "la.png"), grey3(grey))
    assert np.array_equal(saved(tmp_path, Image.fromarray(bits), "1.png"), grey3(bits * 255))


def test_palette_images_with_and_without_transparency(tmp_path):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    want = palette[index].transpose(2, 0, 1)
    assert np.array_equal(saved(tmp_path, img, "p.png"), want)
    img.info["transparency"] = int(index[0, 0])  # one colour transparent: its RGB is kept, the alpha dropped
    assert np.array_equal(saved(tmp_path, img, "p-transparent.png"), want)


def test_cmyk_and_ycbcr(tmp_path):
    cmyk = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    want = np.rint((255 - c) * (255 - k) / 255).astype(np.uint8).transpose(2, 0, 1)
    assert np.array_equal(saved(tmp_path, Image.fromarray(cmyk, "CMYK"), "cmyk.tif"), want)
    ycc = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    jfif = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)])
    got = rgb_pixels(Image.fromarray(ycc, "YCbCr"), Path("ycc"))
    assert np.abs(got.astype(np.float64) - np.clip(jfif, 0, 255)).max() <= 1.0  # Pillow's fixed-point JFIF


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = RNG.integers(178, 63618, (H, W)).astype(np.uint16)  # the range that became 99.7% white
    got = saved(tmp_path, Image.fromarray(values), "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert np.array_equal(got, grey3(np.round(values / 257.0)))
    assert len(np.unique(got)) > 25  # of 35 pixels (clipped at 255 instead, nearly all were 255)


def test_16_bit_rgb_keeps_its_high_byte(tmp_path):
    values = RNG.integers(0, 65536, (H, W, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), values[..., ::-1])  # Pillow writes no 48-bit PNG; OpenCV does
    assert np.array_equal(read_rgb(tmp_path / "rgb16.png"), (values >> 8).astype(np.uint8).transpose(2, 0, 1))


def test_32_bit_integers_are_read_as_16_bit_when_they_fit(tmp_path):
    values = RNG.integers(0, 65536, (H, W)).astype(np.int32)
    assert np.array_equal(saved(tmp_path, Image.fromarray(values, "I"), "i.tif"), grey3(np.round(values / 257.0)))
    values[0, 0] = 70_000
    Image.fromarray(values, "I").save(tmp_path / "wide.tif")
    with pytest.raises(DataError, match=r"wide.tif: an image of Pillow's mode I holds values in \[\d+, 70000\]"):
        read_rgb(tmp_path / "wide.tif")


def test_float_images_in_0_1_are_scaled_and_others_refused(tmp_path):
    values = RNG.uniform(0.01, 1.0, (H, W)).astype(np.float32)  # the range that became all zeros
    got = saved(tmp_path, Image.fromarray(values, "F"), "f.tif")
    assert np.array_equal(got, grey3(np.rint(values.astype(np.float64) * 255)))
    Image.fromarray(values * 255, "F").save(tmp_path / "f255.tif")
    with pytest.raises(
        DataError, match=r"f255.tif: an image of Pillow's mode F holds values in \[.*\], not in \[0, 1\]"
    ):
        read_rgb(tmp_path / "f255.tif")
    nan = values.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="not in \\[0, 1\\]"):
        read_rgb(tmp_path / "nan.tif")


def test_lab_and_hsv_take_pillow_s_conversion():
    for mode in ("LAB", "HSV"):
        img = Image.fromarray(RNG.integers(0, 256, (H, W, 3)).astype(np.uint8), mode)
        assert np.array_equal(rgb_pixels(img, Path(mode)), np.asarray(img.convert("RGB")).transpose(2, 0, 1))


def test_sizes_are_checked_from_the_headers_before_anything_is_decoded(tmp_path, monkeypatch):
    paths = []
    for i, size in enumerate([(8, 8), (8, 8), (9, 8)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", size).save(paths[-1])
    decoded = []
    monkeypatch.setattr(images, "read_rgb", lambda p: decoded.append(p))
    with pytest.raises(DataError, match=r"2.png is 9x8 while .*0.png is 8x8"):
        decode_images(paths)
    with pytest.raises(DataError, match=r"0.png is 8x8 \(64 pixels\), over the limit of 63"):
        decode_images(paths[:2], max_pixels=63)
    monkeypatch.setattr(images, "available_memory", lambda: 100)
    with pytest.raises(DataError, match=r"decoding 2 images of 8x8 needs 0.0 GiB, over the 0.0 GiB of memory"):
        decode_images(paths[:2])
    assert decoded == []


def test_a_store_larger_than_memory_is_one_line_before_it_is_read(tmp_path):
    """An imported set whose train_images.npy declares (10^9, 3, 8, 8): a sparse file of 179 GiB on disk."""
    write_folder(tmp_path / "src")
    from forde.data.imagefolder import import_folder

    store = import_folder(tmp_path / "src", "mine", tmp_path / "data")
    path = store / "train_images.npy"
    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(10**9, 3, 8, 8))
    del header  # written sparse: nothing but the header is on disk
    with pytest.raises(DataError, match=r"train_images.npy \(uint8 \(1000000000, 3, 8, 8\)\) needs 178.8 GiB, over"):
        load_dataset(DataConfig(name="mine", root=str(tmp_path / "data")))


def test_a_one_class_store_is_refused_where_it_is_loaded(tmp_path):
    import torch

    from forde.data.base import Split

    one = Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    save_store(tmp_path / "data" / "solo", {"train": one, "test": one}, ["only"])
    with pytest.raises(DataError, match=r"dataset 'solo': the train split holds examples of 1 class \(only\)"):
        load_dataset(DataConfig(name="solo", root=str(tmp_path / "data")))
