"""Corruptions: contract, determinism, damage ordering, spot checks against the published scripts, generation."""

from __future__ import annotations

import colorsys
import hashlib
import io
import os
import shutil
import subprocess
from functools import cache

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage.filters import gaussian as sk_gaussian

from forde.analysis.corruption_grid import save_corruption_grid
from forde.cli import run_corrupt_command
from forde.data import corruptions as C
from forde.data.corrupted_loader import load_corrupted
from forde.data.corrupted_sets import corruption_rng, generate_corrupted_set
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES

TABLE_SIDES = {"cifar": 32, "tiny": 64}
DETERMINISTIC = {
    "defocus_blur",
    "zoom_blur",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "gaussian_blur",
    "saturate",
}


def natural_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 [n, side, side, 3]: colour gradient, a disc, a box, smooth texture, fine stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    images = []
    for _ in range(n):
        c = rng.uniform(0.15, 0.85, (3, 3))
        img = c[0] + c[1] * (xx[..., None] - 0.5) + c[2] * (yy[..., None] - 0.5)
        cy, cx, r = *rng.uniform(0.3, 0.7, 2), rng.uniform(0.12, 0.3)
        img = np.where((((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)[..., None], rng.uniform(0, 1, 3), img)
        y0, x0 = rng.integers(0, side // 2, 2)
        h, w = rng.integers(side // 6, side // 3, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 1, 3)
        texture = ndimage.gaussian_filter(rng.normal(size=(side, side, 3)), (side / 32, side / 32, 0))
        img = img + 0.15 * texture / texture.std() + 0.05 * np.sin(2 * np.pi * xx * 5)[..., None]
        images.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.stack(images)


@cache
def corrupted(name: str, table: str, severity: int, seed: int = 0) -> np.ndarray:
    """Four natural images at the table's side; one seed for all severities (common random numbers)."""
    return C.corrupt(natural_images(4, TABLE_SIDES[table]), name, severity, np.random.default_rng(seed), table)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("table", ["cifar", "tiny"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_contract_and_determinism(name, table):
    clean = natural_images(4, TABLE_SIDES[table])
    for severity in SEVERITIES:
        out = corrupted(name, table, severity)
        assert out.shape == clean.shape and out.dtype == np.uint8
        assert (out != clean).any(), "every corruption changes the image at every severity"
        again = C.corrupt(clean, name, severity, np.random.default_rng(0), table)
        np.testing.assert_array_equal(out, again)
        other = C.corrupt(clean, name, severity, np.random.default_rng(1), table)
        assert np.array_equal(out, other) == (name in DETERMINISTIC)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_small_grey_and_odd_sides(name):
    grey = natural_images(2, 8)[..., :1]
    out = C.corrupt(grey, name, 5, np.random.default_rng(0))
    assert out.shape == (2, 8, 8, 1) and out.dtype == np.uint8
    for side, table in [(16, "cifar"), (16, "tiny"), (40, None)]:
        images = natural_images(2, side)
        assert C.corrupt(images, name, 3, np.random.default_rng(0), table).shape == images.shape


def test_grey_is_channel_mean_of_rgb_result():
    grey = natural_images(3, 16)[..., :1]
    rgb = C.corrupt(np.repeat(grey, 3, axis=-1), "fog", 4, np.random.default_rng(5))
    np.testing.assert_array_equal(
        C.corrupt(grey, "fog", 4, np.random.default_rng(5)), rgb.mean(axis=-1, keepdims=True).astype(np.uint8)
    )


def test_result_per_image_does_not_depend_on_batching():
    images = natural_images(300, 8)  # more than one internal chunk
    whole = C.corrupt(images, "gaussian_noise", 2, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    parts = [C.corrupt(images[:1], "gaussian_noise", 2, rng), C.corrupt(images[1:300], "gaussian_noise", 2, rng)]
    np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_table_picked_by_side_and_bad_requests_rejected():
    assert C.default_table(32) == "cifar" and C.default_table(48) == "cifar" and C.default_table(64) == "tiny"
    images = natural_images(1, 16)
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(images, "rain", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(images, "fog", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="square"):
        C.corrupt(natural_images(1, 16)[:, :8], "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(images.astype(np.float32), "fog", 1, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- damage ordering
# Pairs (milder, harsher): the harsher severity must have the lower PSNR to the clean image. By default the
# severities are strictly ordered; the exceptions follow from the published parameters, not from noise.
MILDER_HARSHER = {
    # Severities 1-3 blur the shuffled pixels more and more (PSNR rises); the 2-pass ones (4, 5) are worst.
    ("glass_blur", "cifar"): [(m, h) for m in (1, 2, 3) for h in (4, 5)],
    # 1-pass delta-1 (s1, s2) are the mildest; s5 (2 passes, delta 2) is the worst.
    ("glass_blur", "tiny"): [(m, h) for m in (1, 2) for h in (3, 4, 5)] + [(3, 5), (4, 5)],
    # s3 (6, 2) and s4 (8, 2) share sigma; s4's extra taps weigh < 1e-7 (checked below).
    ("motion_blur", "cifar"): [(1, 2), (2, 3), (3, 5), (4, 5)],
    # The image weight drops while the frost weight rises; beyond s2 the two partly cancel in PSNR.
    ("frost", "cifar"): [(1, 2), (1, 3), (1, 4), (1, 5), (2, 3)],
    ("frost", "tiny"): [(1, 2), (1, 3), (1, 4), (1, 5), (4, 5)],
    # 64 -> 38 -> 64 box resampling (s4) costs about as much as the exact 2x2 blocks of s5 (64 -> 32).
    ("pixelate", "tiny"): [(1, 2), (2, 3), (3, 5), (2, 4)],
    # Water for s1-3, mud for s4-5: each kind worsens with severity.
    ("spatter", "cifar"): [(1, 2), (2, 3), (4, 5), (1, 5)],
    ("spatter", "tiny"): [(1, 2), (2, 3), (4, 5), (1, 5)],
    # s1, s2 desaturate (x0.3, x0.1), s3-5 oversaturate: each direction worsens with severity.
    ("saturate", "cifar"): [(1, 2), (3, 4), (4, 5)],
    ("saturate", "tiny"): [(1, 2), (3, 4), (4, 5)],
}
CONSECUTIVE = [(s, s + 1) for s in SEVERITIES[:-1]]


@pytest.mark.parametrize("table", ["cifar", "tiny"])
@pytest.mark.parametrize("name", [c for c in CORRUPTIONS if c != "elastic_transform"])
def test_damage_grows_with_severity(name, table):
    clean = natural_images(4, TABLE_SIDES[table])
    score = {s: np.mean([psnr(o, c) for o, c in zip(corrupted(name, table, s), clean)]) for s in SEVERITIES}
    for milder, harsher in MILDER_HARSHER.get((name, table), CONSECUTIVE):
        assert score[harsher] < score[milder], (milder, harsher, score)


def test_cifar_motion_blur_severities_3_and_4_coincide():
    assert np.mean(corrupted("motion_blur", "cifar", 3) == corrupted("motion_blur", "cifar", 4)) > 0.999


def _non_affine_displacement(out: np.ndarray, step: int) -> float:
    """RMS of the warp left after the best affine fit, read from coordinate-ramp images (R = x, G = y)."""
    side = out.shape[1]
    inner = slice(side // 8, side - side // 8)  # away from the reflected borders
    yy, xx = np.mgrid[0:side, 0:side]
    design = np.stack([xx[inner, inner].ravel(), yy[inner, inner].ravel(), np.ones(xx[inner, inner].size)], 1)
    rms = []
    for img in out:
        source = img[inner, inner, :2].reshape(-1, 2) / step
        coef, *_ = np.linalg.lstsq(design, source, rcond=None)
        rms.append(np.sqrt(np.mean((source - design @ coef) ** 2)))
    return float(np.mean(rms))


@pytest.mark.parametrize("table", ["cifar", "tiny"])
def test_elastic_distortion_grows_with_severity(table):
    """PSNR would rank elastic backwards: the published affine jitter shrinks with severity (CIFAR 2.56 -> 0.96 px)
    and global shifts dominate PSNR. The damage that grows is the non-affine warp (alpha up, sigma down)."""
    side = TABLE_SIDES[table]
    step = 256 // side
    yy, xx = np.mgrid[0:side, 0:side] * step
    ramps = np.repeat(np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8)[None], 4, axis=0)
    warp = [
        _non_affine_displacement(C.corrupt(ramps, "elastic_transform", s, np.random.default_rng(0), table), step)
        for s in SEVERITIES
    ]
    assert warp[0] < 0.6 / step  # s1 is affine only: what is left is uint8 rounding
    # Tiny s2's field is smoothed with sigma = 19 px, so it is almost affine too.
    assert warp[1] > warp[0] if table == "cifar" else warp[1] < warp[0] + 0.01
    assert warp[1] < warp[2] < warp[3] < warp[4]


# ---------------------------------------------------------------------------------------------- published facts


def test_parameter_tables_match_the_scripts():
    cifar, tiny = C.TABLES["cifar"].params, C.TABLES["tiny"].params
    assert cifar["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert cifar["shot_noise"][0] == 500 and tiny["shot_noise"][4] == 15
    assert cifar["glass_blur"][3] == (0.25, 1, 2) and tiny["glass_blur"][4] == (0.9, 2, 2)
    assert cifar["motion_blur"][4] == (9, 2.5) and tiny["motion_blur"][4] == (12, 3)
    assert cifar["snow"][4] == (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8) and tiny["snow"][0][6] == 0.8
    assert cifar["spatter"][3] == (0.65, 0.1, 0.7, 0.69, 0.6, 1) and tiny["spatter"][4][3] == 0.67
    assert cifar["contrast"][4] == 0.15 and tiny["contrast"] == (0.4, 0.3, 0.2, 0.1, 0.05)
    assert cifar["saturate"][4] == (2.5, 0.2) and tiny["saturate"][4] == (30, 0.2)
    assert cifar["jpeg_compression"] == (80, 65, 58, 50, 40) and tiny["jpeg_compression"][4] == 25
    assert cifar["frost"][4] == (0.75, 0.45) and tiny["frost"][1] == (0.9, 0.4)
    assert (C.TABLES["cifar"].frost_scale, C.TABLES["tiny"].frost_scale) == (0.2, 0.3)
    # elastic is published as multiples of the side: CIFAR s2 = 32 x (.05, .2, .07)
    assert np.allclose([32 * f for f in cifar["elastic_transform"][1]], (1.6, 6.4, 2.24))
    assert np.allclose([64 * f for f in tiny["elastic_transform"][4]], (10.24, 1.92, 1.28))


def test_derived_sizes():
    assert [len(C.zoom_factors(end)) for end in C.TABLES["cifar"].params["zoom_blur"]] == [7, 12, 16, 21, 26]
    assert C.zoom_factors(1.06)[-1] == pytest.approx(1.06)  # float arange keeps the end point
    assert [C.pixelate_side(32, f) for f in C.TABLES["cifar"].params["pixelate"]] == [30, 28, 27, 24, 20]
    assert [C.pixelate_side(64, f) for f in C.TABLES["tiny"].params["pixelate"]] == [57, 51, 44, 38, 32]
    assert C.pixelate_side(1, 0.5) == 1
    assert [C.motion_blur_taps(r) for r, _ in C.TABLES["cifar"].params["motion_blur"]] == [13, 13, 13, 17, 19]
    assert [C.motion_blur_taps(r) for r, _ in C.TABLES["tiny"].params["motion_blur"]] == [21, 21, 21, 21, 25]
    assert C.plasma_fractal_draws(32) == 3 * (1 + 4 + 16 + 64 + 256)
    kernel = C.disk_kernel(1.5, 0.1)
    assert kernel.shape == (17, 17) and kernel.dtype == np.float32
    assert kernel.sum() == pytest.approx(1, abs=1e-6) and np.allclose(kernel, kernel.T)


def test_frost_textures_are_the_published_files():
    md5 = {
        "frost1.png": "6ead634ace1f366d77e87078b465863c",
        "frost2.png": "98f0d2b1d74a048d3bc9c7ecfd886939",
        "frost3.png": "b3ed8eb147824261888e730f916c0d8b",
        "frost4.jpg": "d70b9d6aa0b1fe7bd8133b113787e078",
        "frost5.jpg": "50984ae2c871b7df2c28f1d71ca460a0",
    }
    assert {f: hashlib.md5((C.FROST_DIR / f).read_bytes()).hexdigest() for f in C.FROST_FILES} == md5
    assert [t.shape[:2] for t in C.frost_textures(0.2)] == [(120, 180), (63, 112), (63, 112), (70, 105), (99, 132)]
    assert [t.shape[0] for t in C.frost_textures(0.3)][:2] == [180, 94]
    spec = C.TABLES["cifar"]
    assert C.frost_scale(spec, 16) == 0.2 and C.frost_scale(spec, 48) == pytest.approx(0.3)


def test_glass_blur_copies_instead_of_swapping():
    x = np.arange(25, dtype=np.uint8).reshape(1, 5, 5, 1)
    shifts = np.tile([-1, -1], (1, 9, 1))  # every visited pixel (rows/cols 4..2) reads its up-left neighbour
    out = C.glass_blur_shuffle(x.copy(), 1, shifts)[0, ..., 0]
    expected = x[0, ..., 0].copy()
    expected[2:, 2:] = x[0, 1:4, 1:4, 0]  # neighbours are visited later, so still hold their own values
    np.testing.assert_array_equal(out, expected)  # a true swap would also move values up-left


def test_glass_blur_reads_already_updated_pixels_in_visit_order():
    x = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1)
    shifts = np.tile([0, 1], (1, 16, 1))  # delta 2, visits rows/cols 6..3; each reads the pixel below
    out = C.glass_blur_shuffle(x.copy(), 2, shifts)[0, ..., 0]
    expected = x[0, ..., 0].copy()
    expected[3:7, 3:7] = x[0, 7, 3:7, 0]  # row 6 took row 7, row 5 then took row 6's new value, ...
    np.testing.assert_array_equal(out, expected)


def test_contrast_and_brightness_formulas_brute_force():
    images = natural_images(2, 8)
    for s, factor in enumerate(C.TABLES["cifar"].params["contrast"], start=1):
        out = C.corrupt(images, "contrast", s, np.random.default_rng(0))
        expected = np.empty_like(images)
        for n in range(len(images)):
            for ch in range(3):
                x = images[n, ..., ch] / 255.0
                expected[n, ..., ch] = (np.clip((x - x.mean()) * factor + x.mean(), 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(out, expected)
    offset = C.TABLES["cifar"].params["brightness"][2]
    out = C.corrupt(images, "brightness", 3, np.random.default_rng(0))
    expected = np.empty_like(images)
    for idx in np.ndindex(images.shape[:3]):
        h, s, v = colorsys.rgb_to_hsv(*(images[idx] / 255.0))
        expected[idx] = (np.clip(colorsys.hsv_to_rgb(h, s, min(v + offset, 1.0)), 0, 1) * 255).astype(np.uint8)
    assert np.abs(out.astype(int) - expected).max() <= 1 and np.mean(out == expected) > 0.99


def test_final_cast_truncates():
    half = np.zeros((1, 8, 8, 3), np.uint8)
    half[:, :, 4:] = 255  # channel means 127.5; contrast 0.75 gives 31.875 and 223.125
    out = C.corrupt(half, "contrast", 1, np.random.default_rng(0))
    assert set(np.unique(out)) == {31, 223}


def test_gaussian_and_zoom_helpers_match_scikit_image_and_scipy():
    batch = np.random.default_rng(0).random((3, 16, 16, 3))
    np.testing.assert_array_equal(
        C._gaussian(batch, 0.7), np.stack([sk_gaussian(b, sigma=0.7, channel_axis=-1) for b in batch])
    )
    x = batch.astype(np.float32)
    for factor in C.zoom_factors(1.26)[1::6]:
        crop = int(np.ceil(16 / factor))
        top = (16 - crop) // 2
        zoomed = ndimage.zoom(x[:, top : top + crop, top : top + crop], (1, factor, factor, 1), order=1)
        trim = (zoomed.shape[1] - 16) // 2
        np.testing.assert_allclose(C._clipped_zoom(x, factor), zoomed[:, trim : trim + 16, trim : trim + 16], atol=1e-6)


def test_motion_blur_trails_one_way_with_gaussian_weights():
    assert C.motion_blur_offsets(6, 0).tolist() == [[0, i] for i in range(13)]
    assert C.motion_blur_offsets(6, 90).tolist() == [[i, 0] for i in range(13)]
    assert C.motion_blur_offsets(2, 45)[:, 0].tolist() == [0, 1, 1, 2, 3]  # ceil(i cos 45 - 0.5)
    dot = np.zeros((1, 9, 9, 1), np.uint8)
    dot[0, 4, 4] = 255
    out = C._imagemagick_motion_blur(dot, 3, 1.0, np.array([0.0]))[0, ..., 0].astype(float)
    weights = np.exp(-(np.arange(7) ** 2) / 2.0)
    # pixel (4, 4 - i) reads the dot through tap i; nothing lands to the right of it
    np.testing.assert_allclose(out[4, 4::-1], np.floor(255 * weights[:5] / weights.sum() + 0.5 / 257), atol=1)
    assert out[4, 5:].sum() == 0 and out[[3, 5]].sum() == 0


def _imagemagick6_q16() -> bool:
    """The build the scripts most likely ran (ImageMagick 6, 16-bit quanta, no HDRI); others round differently."""
    if shutil.which("convert") is None:
        return False
    version = subprocess.run(["convert", "-version"], capture_output=True, text=True).stdout
    return version.startswith("Version: ImageMagick 6.") and " Q16 " in version and "HDRI" not in version


@pytest.mark.skipif(not _imagemagick6_q16(), reason="needs ImageMagick 6 Q16 (non-HDRI) as `convert`")
def test_motion_blur_matches_imagemagick(tmp_path):
    images = natural_images(2, 32, seed=4)
    for k, (img, angle) in enumerate(zip(images, (-30.5, 112.25))):
        src, dst = tmp_path / f"{k}.png", tmp_path / f"{k}-blur.png"
        Image.fromarray(img).save(src)
        subprocess.run(["convert", str(src), "-motion-blur", f"9x2.5+{angle}", str(dst)], check=True)
        reference = np.asarray(Image.open(dst).convert("RGB"))
        np.testing.assert_array_equal(C._imagemagick_motion_blur(img[None], 9, 2.5, np.array([angle]))[0], reference)


def test_impulse_noise_flips_the_published_share():
    images = np.full((4, 32, 32, 3), 128, np.uint8)
    out = C.corrupt(images, "impulse_noise", 5, np.random.default_rng(0), "cifar")
    assert set(np.unique(out)) == {0, 128, 255}
    assert np.mean(out != 128) == pytest.approx(0.07, abs=0.01)
    assert np.mean(out == 255) == pytest.approx(np.mean(out == 0), abs=0.01)


# ---------------------------------------------------------------------------------------------- generation

GEN_NAMES = ("gaussian_noise", "frost", "contrast")  # release order


def small_split(n: int = 6, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(natural_images(n, side, seed=9)).permute(0, 3, 1, 2).contiguous()
    return images, torch.arange(n) % 3


def test_generate_writes_the_cifar_c_layout(tmp_path):
    images, labels = small_split()
    report = generate_corrupted_set(images, labels, tmp_path, corruptions=GEN_NAMES, seed=3, progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{n}.npy" for n in GEN_NAMES] + ["labels.npy"])
    assert report.assembled == list(GEN_NAMES) and len(report.written) == 15
    stored_labels = np.load(tmp_path / "labels.npy")
    assert stored_labels.dtype == np.uint8 and stored_labels.tolist() == labels.tolist() * 5
    nhwc = images.permute(0, 2, 3, 1).numpy()
    for name in GEN_NAMES:
        data = np.load(tmp_path / f"{name}.npy")
        assert data.shape == (30, 16, 16, 3) and data.dtype == np.uint8
        for s in SEVERITIES:
            np.testing.assert_array_equal(
                data[(s - 1) * 6 : s * 6], C.corrupt(nhwc, name, s, corruption_rng(3, name, s), "cifar")
            )


def test_generation_resumes_without_redoing_work(tmp_path):
    images, labels = small_split()
    generate_corrupted_set(images, labels, tmp_path, corruptions=GEN_NAMES, progress=False, workers=1)
    reference = {n: np.load(tmp_path / f"{n}.npy") for n in GEN_NAMES}
    mtimes = {n: os.stat(tmp_path / f"{n}.npy").st_mtime_ns for n in GEN_NAMES}
    (tmp_path / "frost.npy").unlink()
    (tmp_path / "frost.npy.tmp").write_bytes(b"half-written")  # an interrupted write
    # a run stopped part-way: two frost severities already done
    generate_corrupted_set(
        images, labels, tmp_path, corruptions=["frost"], severities=[2, 4], progress=False, workers=1
    )
    assert not (tmp_path / "frost.npy").exists() and len(list((tmp_path / "parts").iterdir())) == 2
    report = generate_corrupted_set(images, labels, tmp_path, corruptions=GEN_NAMES, progress=False, workers=1)
    assert sorted(report.written) == [("frost", s) for s in (1, 3, 5)]
    assert len(report.skipped) == 12 and report.assembled == ["frost"]
    assert not (tmp_path / "parts").exists() and not (tmp_path / "frost.npy.tmp").exists()
    for name in GEN_NAMES:
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), reference[name])
    assert all(os.stat(tmp_path / f"{n}.npy").st_mtime_ns == mtimes[n] for n in ("gaussian_noise", "contrast"))
    # a run stopped while deleting the blocks of an assembled file
    (tmp_path / "parts").mkdir()
    np.save(tmp_path / "parts" / "frost_s1.npy", reference["frost"][:6])
    report = generate_corrupted_set(images, labels, tmp_path, corruptions=["frost"], progress=False, workers=1)
    assert report.written == [] and not (tmp_path / "parts").exists()


def test_generation_same_seed_same_files_any_worker_count(tmp_path):
    images, labels = small_split()
    kwargs = dict(corruptions=["gaussian_noise", "glass_blur"], severities=[1, 5], progress=False)
    generate_corrupted_set(images, labels, tmp_path / "a", seed=1, workers=1, **kwargs)
    generate_corrupted_set(images, labels, tmp_path / "b", seed=1, workers=2, **kwargs)
    generate_corrupted_set(images, labels, tmp_path / "c", seed=2, workers=1, **kwargs)
    for part in sorted((tmp_path / "a" / "parts").iterdir()):
        assert part.read_bytes() == (tmp_path / "b" / "parts" / part.name).read_bytes()
        assert part.read_bytes() != (tmp_path / "c" / "parts" / part.name).read_bytes()


def test_generation_refuses_a_folder_of_another_set(tmp_path):
    images, labels = small_split()
    generate_corrupted_set(images, labels, tmp_path, corruptions=["contrast"], progress=False, workers=1)
    with pytest.raises(ValueError, match="other labels"):
        generate_corrupted_set(images, labels.flip(0), tmp_path, corruptions=["contrast"], progress=False)


def test_folder_layout_written_and_read_back(tmp_path):
    images, labels = small_split()
    wnids = ("n02", "n01", "n03")
    files = tuple(f"val_{i}.JPEG" for i in range(6))
    generate_corrupted_set(
        images,
        labels,
        tmp_path,
        corruptions=["contrast"],
        severities=[2, 5],
        layout="folder",
        class_dirs=wnids,
        file_names=files,
        progress=False,
        workers=1,
    )
    assert sorted(p.name for p in (tmp_path / "contrast").iterdir()) == ["2", "5"]
    assert (tmp_path / "contrast" / "2" / "n02" / "val_3.JPEG").is_file()
    written = os.stat(tmp_path / "contrast" / "2" / "n02" / "val_3.JPEG").st_mtime_ns
    (tmp_path / "contrast" / ".3.tmp" / "n01").mkdir(parents=True)  # an interrupted severity
    report = generate_corrupted_set(
        images,
        labels,
        tmp_path,
        corruptions=["contrast"],
        severities=[2, 3, 5],
        layout="folder",
        class_dirs=wnids,
        file_names=files,
        progress=False,
        workers=1,
    )
    assert report.written == [("contrast", 3)] and sorted(p.name for p in (tmp_path / "contrast").iterdir()) == [
        "2",
        "3",
        "5",
    ]
    assert os.stat(tmp_path / "contrast" / "2" / "n02" / "val_3.JPEG").st_mtime_ns == written
    split = load_corrupted(tmp_path, "contrast", 2)
    expected = C.corrupt(images.permute(0, 2, 3, 1).numpy(), "contrast", 2, corruption_rng(0, "contrast", 2))
    order = [1, 4, 0, 3, 2, 5]  # sorted class dirs n01 (label 1), n02 (label 0), n03 (label 2)
    assert split.inputs.shape == (6, 3, 16, 16) and split.inputs.dtype == torch.uint8
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for got, i in zip(split.inputs.permute(0, 2, 3, 1).numpy(), order):
        buffer = io.BytesIO()
        Image.fromarray(expected[i]).save(buffer, "JPEG", quality=85, optimize=True)
        np.testing.assert_array_equal(got, np.asarray(Image.open(buffer)))


def test_run_corrupt_command_reports_what_it_wrote(tmp_path, capsys):
    images, labels = small_split(side=8)
    report = run_corrupt_command(images, labels, tmp_path, None, 0, ["benchmark"], [5], "npy", 1)
    out = capsys.readouterr().out
    assert "15 corruptions" in out and str(tmp_path) in out and "parts" in out
    assert len(report.written) == 15
    assert load_corrupted(tmp_path, "fog", 5).inputs.shape == (6, 3, 8, 8)


def test_corruption_grid(tmp_path):
    path = save_corruption_grid(natural_images(1, 16)[0], tmp_path / "grid.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.height > img.width
