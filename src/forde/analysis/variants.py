"""Method variants as the paper names them, in one fixed order and one fixed colour each, so that a
method looks the same in every table and figure."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

from matplotlib.colors import to_hex, to_rgb

PCA, IDENTITY = 1.0, 0.0

BASE = {  # label -> colour: the Okabe-Ito palette (colour-blind safe), one hue per method, then a brown
    "DE": "#000000",  # black: the baseline every figure compares with
    "node-BNN": "#8C510A",  # brown
    "SWAG": "#56B4E9",  # sky blue
    "Weight-RDE": "#E69F00",  # orange
    "Function-RDE": "#F0E442",  # yellow
    "Feature-RDE": "#999999",  # grey
    "LIT": "#CC79A7",  # reddish purple
    "FoRDE-Identity": "#009E73",  # bluish green
    "FoRDE-PCA": "#D55E00",  # vermillion
}
TUNED = "#0072B2"  # FoRDE-Tuned: shades of Okabe-Ito's blue, darker for larger alpha
ORDER = (
    "DE",
    "node-BNN",
    "SWAG",
    "Weight-RDE",
    "Function-RDE",
    "Feature-RDE",
    "LIT",
    "FoRDE-Identity",
    "FoRDE-Tuned",
    "FoRDE-PCA",
)
NAMES = {
    "de": "DE",
    "rde_weight": "Weight-RDE",
    "rde_function": "Function-RDE",
    "rde_feature": "Feature-RDE",
    "lit": "LIT",
    "swag": "SWAG",
    "node_bnn": "node-BNN",
}
MARKERS = {  # a marker per variant too, so that rows stay apart in grey print (the paper's diamonds are "D")
    "DE": "o",
    "node-BNN": "v",
    "SWAG": "^",
    "Weight-RDE": "s",
    "Function-RDE": "p",
    "Feature-RDE": "P",
    "LIT": "X",
    "FoRDE-Identity": "<",
    "FoRDE-Tuned": ">",
    "FoRDE-PCA": "h",
}


def variant(method: str, alpha: float | None = None) -> str:
    """The paper's label for a method (and FoRDE's lengthscale mix alpha, to 3 significant digits: a sampled
    0.131253 reads 0.131)."""
    if method != "forde":
        return NAMES.get(method, method)
    if alpha is None or alpha == PCA:
        return "FoRDE-PCA"
    if alpha == IDENTITY:
        return "FoRDE-Identity"
    return f"FoRDE-Tuned (α={alpha:.3g})"


def method_variant(label: str) -> str:
    """A row's method variant, without what sets its recipe apart (`FoRDE-PCA [optim.lr=0.05]` -> `FoRDE-PCA`)."""
    return label.split(" [", 1)[0]


def tuned_alpha(label: str) -> float | None:
    label = method_variant(label)
    if label.startswith("FoRDE-Tuned (α="):
        return float(label[len("FoRDE-Tuned (α=") : -1])
    return None


def color(label: str) -> str:
    """A fixed colour per variant; tuned FoRDE variants get lighter shades of one blue for smaller alpha."""
    label = method_variant(label)
    if label in BASE:
        return BASE[label]
    alpha = tuned_alpha(label)
    if alpha is not None:
        h, _, s = colorsys.rgb_to_hls(*to_rgb(TUNED))
        return to_hex(colorsys.hls_to_rgb(h, 0.75 - 0.45 * alpha, s))
    return "#7F7F7F"


def marker(label: str) -> str:
    """A fixed marker per variant (every tuned FoRDE shares one; unknown methods get a dot)."""
    label = method_variant(label)
    return MARKERS.get("FoRDE-Tuned" if tuned_alpha(label) is not None else label, ".")


def family(label: str) -> str:
    """The variant a row's place, colour and marker come from: tuned FoRDE at any alpha is one family."""
    return "FoRDE-Tuned" if tuned_alpha(label) is not None else method_variant(label)


def sort_key(label: str) -> tuple[int, float, str]:
    """Paper order: baselines first, FoRDE variants last (tuned ones by alpha, between identity and PCA)."""
    base = family(label)
    rank = ORDER.index(base) if base in ORDER else len(ORDER)
    return rank, tuned_alpha(label) or 0.0, label


SPARE_MARKERS = ("o", "s", "^", "v", "p", "P", "X", "<", ">", "h", "*", "d")


def styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A colour and marker per row of one figure: each variant's own (`color`, `marker`), except where a family has
    several rows (tuned FoRDE at close alphas, one variant's recipes): shades of its colour spread evenly from light to
    dark in row order, and a marker each, so that no two rows of a panel look alike."""
    members: dict[str, list[str]] = {}
    for label in sorted(labels, key=sort_key):
        members.setdefault(family(label), []).append(label)
    out = {}
    for name, rows in members.items():
        if len(rows) == 1:
            out[rows[0]] = (color(rows[0]), marker(rows[0]))
            continue
        h, _, s = colorsys.rgb_to_hls(*to_rgb(TUNED if name == "FoRDE-Tuned" else color(rows[0])))
        shapes = [marker(rows[0])] + [m for m in SPARE_MARKERS if m != marker(rows[0])]
        for i, label in enumerate(rows):
            shade = colorsys.hls_to_rgb(h, 0.72 - 0.44 * i / (len(rows) - 1), s)
            out[label] = (to_hex(shade), shapes[i % len(shapes)])
    return out
