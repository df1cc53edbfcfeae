"""FoRDE in a plain PyTorch loop: an ensemble of small CNNs on scikit-learn's 8x8 digits (no download).

    python examples/pytorch_loop.py            # 20 epochs on the CPU
    python examples/pytorch_loop.py --quick    # a few steps, to check that it runs

Prints the test metrics as JSON: accuracy, NLL, ECE, epistemic uncertainty, gradient diversity.
"""

import argparse
import json

import torch
from sklearn.datasets import load_digits
from torch import nn

import forde


def small_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


def digits(n_train: int = 1400):
    """Normalised [N, 1, 8, 8] images and labels: (x_train, y_train, x_test, y_test)."""
    data = load_digits()
    x, y = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:n_train], order[n_train:]
    x = (x - x[train].mean()) / x[train].std()
    return x[train], y[train], x[test], y[test]


def main(epochs: int = 20, members: int = 4, quick: bool = False) -> dict:
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    if quick:
        x_train, y_train, epochs = x_train[:192], y_train[:192], 1
    ensemble = forde.Ensemble([small_cnn() for _ in range(members)])
    loss_fn = forde.FoRDELoss(forde.pca_projection(x_train, alpha=1.0))  # PCA lengthscales of the training inputs
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in range(epochs):
        ensemble.train()
        for batch in torch.randperm(len(y_train)).split(64):
            out = loss_fn(ensemble, x_train[batch], y_train[batch])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v.item():.4f}" for k, v in out.stats.items()))

    ensemble.eval()
    with torch.no_grad():
        log_probs = ensemble(x_test).log_softmax(-1)  # [M, N, C]
    grads = ensemble.input_gradients(x_test, y_test, create_graph=False).grads
    metrics = forde.metrics.ensemble_metrics(log_probs, y_test, grads)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="3 steps on 192 images")
    args = parser.parse_args()
    main(args.epochs, args.members, args.quick)
