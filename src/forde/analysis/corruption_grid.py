"""A figure to check the corruptions by eye: one image under every corruption at every severity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from forde.data.corrupted_sets import corruption_rng
from forde.data.corruption_names import CORRUPTIONS, SEVERITIES
from forde.data.corruptions import corrupt, default_table


def save_corruption_grid(image_hwc: np.ndarray, path, *, table: str | None = None, seed: int = 0) -> Path:
    """One image under every corruption (rows) at clean + severities 1-5 (columns), for checking by eye.

    Uses the same per-(corruption, severity) generators as `generate_corrupted_set`. The cells are tiled into one
    picture (one matplotlib Axes, labelled by its ticks); the format follows the suffix of `path` (.png, .pdf).
    """
    from matplotlib.figure import Figure

    image = np.asarray(image_hwc, dtype=np.uint8)
    image = image[..., None] if image.ndim == 2 else image
    table = table or default_table(image.shape[0])
    rows = [
        [image] + [corrupt(image[None], name, s, corruption_rng(seed, name, s), table)[0] for s in SEVERITIES]
        for name in CORRUPTIONS
    ]
    mosaic, centres_x, centres_y = _tile(rows)
    fig = Figure(figsize=(1.0 * len(rows[0]) + 1.6, 1.0 * len(rows) + 0.7))
    ax = fig.add_axes(
        (
            1.5 / fig.get_figwidth(),
            0.1 / fig.get_figheight(),
            1 - 1.6 / fig.get_figwidth(),
            1 - 0.7 / fig.get_figheight(),
        )
    )
    grey = image.shape[-1] == 1
    ax.imshow(
        mosaic[..., 0] if grey else mosaic, cmap="gray" if grey else None, vmin=0, vmax=255, interpolation="nearest"
    )
    ax.set_xticks(centres_x, ["clean"] + [f"severity {s}" for s in SEVERITIES])
    ax.set_yticks(centres_y, CORRUPTIONS)
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=9)
    ax.set_frame_on(False)
    ax.set_title(f"{image.shape[0]}x{image.shape[1]} image, '{table}' parameters, seed {seed}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=max(100, 4 * image.shape[0]))  # a few screen pixels per image pixel
    return path


def _tile(rows: list[list[np.ndarray]]) -> tuple[np.ndarray, list[float], list[float]]:
    """Cells on a white canvas with gaps of 1/8 side; returns the canvas and the cell centres along x and y."""
    side, channels = rows[0][0].shape[0], rows[0][0].shape[-1]
    pitch = side + max(1, side // 8)
    canvas = np.full((len(rows) * pitch, len(rows[0]) * pitch, channels), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            canvas[r * pitch : r * pitch + side, c * pitch : c * pitch + side] = cell
    centres = lambda count: [i * pitch + (side - 1) / 2 for i in range(count)]  # noqa: E731
    return canvas, centres(len(rows[0])), centres(len(rows))
