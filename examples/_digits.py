"""Helper module for the digits examples (not a script): scikit-learn's digits and a small CNN.

Imported by ``monitor_digits.py``, ``tempbalance_digits.py`` and ``tune_optuna.py``; the 8x8 images ship with
scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from farms_lightning import farms_param_groups


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Train/val/test loaders over a fixed 70/15/15 split of the 1,797 digits; ``seed`` shuffles."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))  # the same split for every seed
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    sets = [TensorDataset(x[p], y[p]) for p in parts]
    return (DataLoader(sets[0], batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
            DataLoader(sets[1], batch_size=256), DataLoader(sets[2], batch_size=256))


class DigitsCNN(pl.LightningModule):
    """Four convolutions and two linear layers (six analysable layers), SGD with a cosine schedule.

    The first convolution (1 input channel: 32x1 kernel-position matrices) is skipped as degenerate,
    so five layers are fitted and three tuned by TempBalance (first and last left out).
    """

    def __init__(self, lr: float = 0.05, epochs: int = 10, per_layer_groups: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train")
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):  # type: ignore[override]
        self._step(batch, "test")

    def configure_optimizers(self):  # type: ignore[override]
        # One param group per layer lets FARMSLRBalancer give every layer its own learning rate.
        params = farms_param_groups(self) if self.hparams.per_layer_groups else self.parameters()
        optimizer = torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.epochs)}
