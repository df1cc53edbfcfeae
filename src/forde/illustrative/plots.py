"""Panels of the illustrative figures: predictive mean and spread (1-D), predictive entropy (2-D)."""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.colors import ListedColormap

from forde.analysis import style
from forde.analysis.variants import color
from forde.illustrative.experiment import Panel

LABELS = {"de": "DE", "rde_weight": "Weight-RDE", "rde_function": "Function-RDE", "forde": "FoRDE"}
COLORS = {
    "de": color("DE"),
    "rde_weight": color("Weight-RDE"),
    "rde_function": color("Function-RDE"),
    "forde": color("FoRDE-Identity"),
}  # the toy FoRDE uses identity lengthscales
CLASS_COLORS = ListedColormap(["#E41A1C", "#377EB8", "#4DAF4A", "#984EA3", "#FF7F00"])


@style.styled
def regression_figure(panels: dict[str, Panel], data: dict[str, torch.Tensor]):
    """One panel per method: members (thin), mean (thick), mean +- 2 std (band), data (dots).
    The grey spans mark where the input lies away from the data (what the score averages over)."""
    fig, axes = style.figure(len(panels), height=1.9, sharey=True)
    grid = data["grid"].numpy()
    for ax, (name, p) in zip(axes[0], panels.items()):
        means = p.grid_values.numpy()
        mu, sd = means.mean(0), means.std(0)
        c = COLORS.get(name, "k")
        _shade(ax, grid, p.far_mask.numpy())
        for member in means:
            ax.plot(grid, member, color=c, lw=0.4, alpha=0.35)
        ax.fill_between(grid, mu - 2 * sd, mu + 2 * sd, color=c, alpha=0.2, lw=0)
        ax.plot(grid, mu, color=c, lw=1.5)
        ax.scatter(data["x"], data["y"], s=2, color="black", zorder=3, lw=0)
        ax.set_title(LABELS.get(name, name))
        _score(ax, f"away from data: {p.score:.3f}")
        ax.set_xlim(grid[0], grid[-1])
        ax.set_xlabel("x")
        ax.grid(False)
    axes[0][0].set_ylabel("y")
    axes[0][0].set_ylim(-2.0, 2.4)
    fig.tight_layout(w_pad=0.6)
    return fig


def _score(ax, text: str) -> None:
    ax.text(
        0.03,
        0.03,
        text,
        transform=ax.transAxes,
        fontsize=6.5,
        va="bottom",
        ha="left",
        bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
    )


def _shade(ax, grid: np.ndarray, far: np.ndarray) -> None:
    edges = np.flatnonzero(np.diff(np.r_[0, far.astype(int), 0]))
    for start, stop in zip(edges[::2], edges[1::2]):
        ax.axvspan(grid[start], grid[stop - 1], color="0.93", lw=0, zorder=0)


@style.styled
def classification_figure(panels: dict[str, Panel], data: dict[str, torch.Tensor]):
    """Entropy of the ensemble's predictive over the input plane, training points on top."""
    fig, axes = style.figure(len(panels), height=1.85, width=style.TEXT_WIDTH + 0.5)
    axis = data["grid"].numpy()
    extent = (axis[0], axis[-1], axis[0], axis[-1])
    image = None
    for ax, (name, p) in zip(axes[0], panels.items()):
        image = ax.imshow(
            p.grid_values.numpy(),
            origin="lower",
            extent=extent,
            cmap="magma",
            vmin=0.0,
            vmax=math.log(5),
            interpolation="bilinear",
        )
        ax.scatter(data["x"][:, 0], data["x"][:, 1], c=data["y"], cmap=CLASS_COLORS, s=3, lw=0.2, edgecolors="white")
        ax.set_title(LABELS.get(name, name))
        _score(ax, f"away from data: {p.score:.3f}")
        ax.set_xticks([]), ax.set_yticks([])
        ax.grid(False)
    bar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.015, pad=0.01)
    bar.set_label("predictive entropy (nats)")
    return fig
