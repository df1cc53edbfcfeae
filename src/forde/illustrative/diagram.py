"""The method diagram of the docs: FoRDE's kernel on one input, computed with forde.kernels from three small
networks trained on 2-D data, so the picture shows what the code does rather than an artist's sketch.
`python analysis/method_diagram.py --out docs/figures`."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib.patches as mpatches
import numpy as np
import torch
from torch import nn

from forde.analysis import style
from forde.kernels import kernel_matrix, lengthscale_weights, median_bandwidth, pairwise_sq_dists, unit_normalize

MEMBERS = 3
COLOURS = ("#0072B2", "#D55E00", "#009E73")  # Okabe-Ito blue, vermillion, green


def toy_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two elongated classes: the data vary much more along one direction than the other, so the PCA
    lengthscales differ."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    spread = torch.randn(n, 2, generator=g) * torch.tensor([0.3, 2.2])
    turn = torch.tensor([[math.cos(0.5), -math.sin(0.5)], [math.sin(0.5), math.cos(0.5)]])
    x = (spread + torch.stack([2.4 * y - 1.2, torch.zeros(n)], 1)) @ turn.T
    return x, y


def train_member(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 100) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def input_gradients(members: list[nn.Module], x0: torch.Tensor, y0: int) -> torch.Tensor:
    """g_i: the gradient of member i's true-class logit with respect to the input, [M, 2]."""
    grads = []
    for net in members:
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(net(x[None])[0, y0], x)
        grads.append(g)
    return torch.stack(grads)


def kernel_and_push(s: torch.Tensor, weights: torch.Tensor, basis: torch.Tensor):
    """The kernel k_ij between unit gradients s [M, 2] under the distance weights, and the repulsion on each s_i:
    minus the gradient of sum_i log sum_j k_ij with the j side held constant (what a training step follows)."""
    s = s.clone().requires_grad_(True)
    z = (s @ basis * weights.sqrt())[:, None, :]  # [M, B=1, D]
    d = pairwise_sq_dists(z, z.detach())
    k = kernel_matrix(d, median_bandwidth(d.detach(), "all_pairs"))
    (grad,) = torch.autograd.grad(k.sum(1).log().sum(), s)
    return k.detach(), -grad


@style.styled
def draw(seed: int = 0):
    x, y = toy_data(seed=seed)
    members = [train_member(x, y, seed=seed + 1 + i) for i in range(MEMBERS)]
    eigenvalues, basis = torch.linalg.eigh(torch.cov(x.T))
    eigenvalues = eigenvalues / eigenvalues.mean()
    at = int(torch.argmin((x - torch.tensor([1.2, 2.6])).norm(dim=1)))  # a training input far along the class
    x0, y0 = x[at], int(y[at])
    s = unit_normalize(input_gradients(members, x0, y0), eps=1e-12)

    fig, axes = style.figure(3, height=2.6)
    a, b, c = axes[0]
    # (a) the members and their input gradients at x0
    grid = torch.stack(torch.meshgrid(torch.linspace(-3.5, 3.5, 200), torch.linspace(-3.5, 3.5, 200), indexing="xy"))
    flat = grid.reshape(2, -1).T
    a.scatter(*x.T, c=np.where(y.numpy() == 1, "0.35", "0.75"), s=3, linewidths=0)
    for net, colour, g in zip(members, COLOURS, s):
        with torch.no_grad():
            margin = (net(flat) @ torch.tensor([-1.0, 1.0])).reshape(200, 200)
        a.contour(grid[0], grid[1], margin, levels=[0.0], colors=[colour], linewidths=1.0)
        a.annotate("", xy=(x0 + 1.2 * g).tolist(), xytext=x0.tolist(), arrowprops={"arrowstyle": "->", "color": colour})
    a.plot(*x0, "k*", ms=7)
    a.set(
        title="(a) members and their input\ngradients at one input $x$",
        aspect="equal",
        xlim=(-3.5, 3.5),
        ylim=(-3.5, 3.5),
    )
    # (b) unit gradients and the kernel's metric: identity (circle) and PCA (ellipse)
    weights = lengthscale_weights(eigenvalues, alpha=1.0)
    k, push = kernel_and_push(s, weights, basis)
    angle = math.degrees(math.atan2(basis[1, 0], basis[0, 0]))
    b.add_patch(mpatches.Circle((0, 0), 1.0, fill=False, ls="--", color="0.5", label="α = 0 (identity)"))
    semi = (1.0 / weights.sqrt()).tolist()
    b.add_patch(
        mpatches.Ellipse((0, 0), 2 * semi[0], 2 * semi[1], angle=angle, fill=False, color="0.2", label="α = 1 (PCA)")
    )
    for i, colour in enumerate(COLOURS):
        b.annotate("", xy=s[i].tolist(), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": colour})
        b.text(*(1.12 * s[i]).tolist(), f"$s_{i + 1}$", color=colour, ha="center", va="center")
    lim = max(1.3, max(semi) + 0.1)
    b.set(
        title="(b) unit gradients $s_i$ and the\nkernel's unit distance",
        aspect="equal",
        xlim=(-lim, lim),
        ylim=(-lim, lim),
    )
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=6, ncols=2)
    # (c) the repulsion each s_i feels, along the sphere
    c.add_patch(mpatches.Circle((0, 0), 1.0, fill=False, color="0.8"))
    scale = 0.5 / push.norm(dim=1).max().clamp_min(1e-12)
    for i, colour in enumerate(COLOURS):
        tangent = push[i] - (push[i] @ s[i]) * s[i]  # the part that moves s_i along the unit circle
        c.plot(*s[i].tolist(), "o", color=colour)
        c.annotate(
            "",
            xy=(s[i] + scale * tangent).tolist(),
            xytext=s[i].tolist(),
            arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5},
        )
    table = "\n".join(" ".join(f"{v:.2f}" for v in row) for row in k.tolist())
    c.text(0.02, 0.02, f"$k_{{ij}}$, α = 1:\n{table}", transform=c.transAxes, fontsize=6, family="monospace")
    c.set(
        title="(c) the repulsion on each $s_i$:\naway from close members",
        aspect="equal",
        xlim=(-1.4, 1.4),
        ylim=(-1.4, 1.4),
    )
    for ax in (a, b, c):
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Draw the method diagram: FoRDE's kernel on one input")
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in style.save(draw(args.seed), args.out / "method-diagram"):
        print(path)
    return 0
