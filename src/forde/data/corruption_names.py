"""The 19 corruption types of CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C, in the release's generation order.

Kept apart from the image code so configs can be validated without importing it.
"""

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
BENCHMARK_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS[:15]  # the other 4 are the release's "extra" set
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def select(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Expand `all` / `benchmark` / `none` into corruption names, keeping explicit names in release order."""
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(CORRUPTIONS)
        elif name == "benchmark":
            chosen.update(BENCHMARK_CORRUPTIONS)
        elif name == "none":
            continue
        elif name in CORRUPTIONS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown corruption '{name}'; known: {', '.join(CORRUPTIONS)}")
    return tuple(c for c in CORRUPTIONS if c in chosen)
