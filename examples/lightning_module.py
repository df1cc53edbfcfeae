"""FoRDE inside a PyTorch Lightning `LightningModule`: the ensemble of `pytorch_loop.py`, trained by a `Trainer`.

    pip install -e '.[lightning]'
    python examples/lightning_module.py            # 20 epochs on the CPU
    python examples/lightning_module.py --quick    # a few steps, to check that it runs

Prints the validation metrics as JSON: accuracy, NLL, ECE, epistemic uncertainty.
"""

import argparse
import json

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import forde
from pytorch_loop import digits, small_cnn


class FoRDEEnsemble(L.LightningModule):
    def __init__(self, projection: torch.Tensor | None, members: int = 4, lr: float = 0.05):
        super().__init__()
        self.members = nn.ModuleList(small_cnn() for _ in range(members))
        self.loss_fn = forde.FoRDELoss(projection)  # follows the members to their device
        self.lr = lr
        self.val_log_probs, self.val_labels = [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.loss_fn(self.members, x, y, step=self.global_step)
        self.log_dict({f"train/{k}": v for k, v in out.stats.items()})
        return out.loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_log_probs.append(torch.stack([m(x) for m in self.members]).log_softmax(-1))
        self.val_labels.append(y)

    def on_validation_epoch_end(self):
        metrics = forde.metrics.ensemble_metrics(torch.cat(self.val_log_probs, 1), torch.cat(self.val_labels))
        self.log_dict({f"val/{k}": metrics[k] for k in ("accuracy", "nll", "ece", "epistemic")})
        self.val_log_probs.clear()
        self.val_labels.clear()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main(epochs: int = 20, members: int = 4, quick: bool = False) -> dict:
    L.seed_everything(0, verbose=False)
    x_train, y_train, x_test, y_test = digits()
    if quick:
        x_train, y_train, epochs = x_train[:192], y_train[:192], 1
    model = FoRDEEnsemble(forde.pca_projection(x_train, alpha=1.0), members)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x_test, y_test), batch_size=500)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not quick,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="3 steps on 192 images")
    args = parser.parse_args()
    main(args.epochs, args.members, args.quick)
