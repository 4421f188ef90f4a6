"""Small deterministic Lightning models and data for the callback and metric tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(pl.LightningModule):
    """Conv + linear layers (no dropout), SGD; deterministic given the seed."""

    def __init__(self, lr: float = 0.05, with_val: bool = True) -> None:
        super().__init__()
        self.with_val = with_val
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(24 * 4 * 4, 160), nn.ReLU(), nn.Linear(160, 120), nn.ReLU(),
                                  nn.Linear(120, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(n: int = 256, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, shuffle=False), DataLoader(data, batch_size=64, shuffle=False)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, enable_progress_bar=False,
                    enable_model_summary=False, limit_train_batches=4, limit_val_batches=2, log_every_n_steps=1,
                    deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class WeightSnapshots(pl.Callback):
    """Copies of the weights at every training-epoch end (after the FARMS analysis of that epoch)."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots.append((trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()}))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.snapshots.append((trainer.global_step, {k: v.clone() for k, v in pl_module.state_dict().items()}))
