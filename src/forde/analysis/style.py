"""Figure style for paper-size figures, and saving every figure as PNG and PDF."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

log = logging.getLogger(__name__)

TEXT_WIDTH = 6.75  # inches: a two-column paper's full text width
RC: dict[RcKeyType, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "figure.titlesize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.3,
    "lines.markersize": 3.5,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,
    "axes.formatter.useoffset": False,  # ticks read as the values themselves, never "+8.45e1" and 0.00, 0.01
}


def styled(draw):
    """Run a drawing function under the paper style (rcParams are read when artists are created)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with plt.rc_context(RC):
            return draw(*args, **kwargs)

    return wrapper


def figure(ncols: int = 1, nrows: int = 1, height: float = 2.0, width: float = TEXT_WIDTH, **kw):
    return plt.subplots(nrows, ncols, figsize=(width, height * nrows), squeeze=False, **kw)


def save(fig, path: Path) -> list[Path]:
    """Write `path`.png and `path`.pdf, close the figure, return both paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        target = path.with_name(f"{path.name}.{ext}")
        fig.savefig(
            target,
            dpi=RC["savefig.dpi"],
            bbox_inches="tight",
            pad_inches=RC["savefig.pad_inches"],
            metadata={"CreationDate": None} if ext == "pdf" else None,  # the same figure, the same bytes
        )
        out.append(target)
    plt.close(fig)
    log.info("wrote %s.{png,pdf}", path)
    return out
