"""The PAPER'S REPORTED NUMBERS (Trinh et al., ICLR 2024, Tables 1, 2 and 4: means over 5 seeds,
M = 10), for side-by-side comparison with our runs (`forde report --paper`).

These are the only published result values in the code base; nothing else may use them as data.
Kept as the strings the paper prints (its precision differs between tables); units as printed:
accuracies in percent, NLL and ECE as fractions. cA / cNLL / cECE are the release's: metrics of each
severity's corruption types pooled into one set, averaged over the severities, as our corrupted/* are.
"""

from __future__ import annotations

COLUMNS = ("test/nll", "test/accuracy", "test/ece", "corrupted/accuracy", "corrupted/nll", "corrupted/ece")


def _rows(table: dict[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    return {variant: dict(zip(COLUMNS, values)) for variant, values in table.items()}


SOURCES = {
    ("cifar100", "resnet18"): "Table 1",
    ("cifar10", "resnet18"): "Table 2",
    ("tinyimagenet", "preact_resnet18"): "Table 4",
}
# How the paper's numbers were made: every table means 5 seeds of M = 10 full-size networks.
PROTOCOL = {
    ("cifar100", "resnet18"): "mean over 5 seeds, M = 10, 300 epochs, the full-size ResNet18",
    ("cifar10", "resnet18"): "mean over 5 seeds, M = 10, 300 epochs, the full-size ResNet18",
    ("tinyimagenet", "preact_resnet18"): "mean over 5 seeds, M = 10, 150 epochs, the full-size PreActResNet18",
}
# The alpha of the paper's FoRDE-Tuned row: its best trade-off on the lengthscale grid (appendix D.4).
TUNED_ALPHA = {("cifar100", "resnet18"): 0.4, ("cifar10", "resnet18"): 0.2}

# (dataset, model) -> variant -> metric: NLL, accuracy %, ECE, cA %, cNLL, cECE
REPORTED: dict[tuple[str, str], dict[str, dict[str, str]]] = {
    ("cifar100", "resnet18"): _rows(
        {
            "DE": ("0.70", "81.8", "0.041", "54.3", "1.99", "0.05"),
            "Weight-RDE": ("0.70", "81.7", "0.043", "54.2", "2.01", "0.06"),
            "Function-RDE": ("0.76", "80.1", "0.042", "51.9", "2.08", "0.07"),
            "Feature-RDE": ("0.75", "82.1", "0.072", "54.8", "2.02", "0.06"),
            "LIT": ("0.70", "81.9", "0.040", "54.4", "1.98", "0.05"),
            "FoRDE-PCA": ("0.71", "81.4", "0.039", "56.1", "1.90", "0.05"),
            "FoRDE-Identity": ("0.70", "82.1", "0.043", "54.1", "2.02", "0.05"),
            "FoRDE-Tuned": ("0.70", "82.1", "0.044", "55.3", "1.94", "0.05"),
        }
    ),
    ("cifar10", "resnet18"): _rows(
        {
            "DE": ("0.117", "96.3", "0.005", "78.1", "0.78", "0.08"),
            "Weight-RDE": ("0.117", "96.2", "0.005", "78.0", "0.78", "0.08"),
            "Function-RDE": ("0.128", "95.8", "0.006", "77.1", "0.81", "0.08"),
            "Feature-RDE": ("0.116", "96.4", "0.004", "78.1", "0.77", "0.08"),
            "LIT": ("0.116", "96.4", "0.004", "78.2", "0.78", "0.09"),
            "FoRDE-PCA": ("0.125", "96.1", "0.006", "80.5", "0.71", "0.07"),
            "FoRDE-Identity": ("0.113", "96.3", "0.005", "78.0", "0.80", "0.08"),
            "FoRDE-Tuned": ("0.114", "96.4", "0.005", "79.1", "0.74", "0.07"),
        }
    ),
    ("tinyimagenet", "preact_resnet18"): _rows(
        {
            "DE": ("1.15", "71.6", "0.035", "31.8", "3.38", "0.09"),
            "Weight-RDE": ("1.15", "71.5", "0.036", "31.7", "3.39", "0.09"),
            "Function-RDE": ("1.21", "70.2", "0.036", "31.1", "3.43", "0.10"),
            "Feature-RDE": ("1.24", "72.0", "0.100", "31.9", "3.35", "0.09"),
            "LIT": ("1.15", "71.5", "0.035", "31.2", "3.40", "0.11"),
            "FoRDE-PCA": ("1.16", "71.4", "0.033", "32.2", "3.28", "0.08"),
        }
    ),
}


def reported(dataset: str, model: str) -> dict[str, dict[str, str]]:
    """The paper's rows for a setting, {} when the paper has no table for it."""
    return REPORTED.get((dataset, model), {})
