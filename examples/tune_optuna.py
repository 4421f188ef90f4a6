"""An Optuna study on scikit-learn's digits where FARMS prunes trials whose layers are not learning.

Each trial trains DigitsCNN with a sampled learning rate and batch size, maximising validation
accuracy. FARMSCallback analyses the weights before training and at the end of every epoch (before
validation, so the pruner sees that epoch's value). A small callback logs ``farms/alpha_drop``, how
far the mean layer alpha has moved below its value at initialisation (the network's own
random-matrix baseline), and Optuna's ``ThresholdPruner`` stops a trial once, from the second
epoch on, that drop is below ``--min-drop``: its weight spectra still look like random matrices.
No validation data is needed for this signal.

Needs: pip install -e ".[tune]"   (from the checkout)
Run: python examples/tune_optuna.py [--trials 8] [--epochs 4] [--min-drop 0.002] [--seed 0]
Prints one row per trial: parameters, state, epochs run, mean-alpha drop per epoch, val accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (default 4)")
    parser.add_argument("--min-drop", type=float, default=0.002,
                        help="prune when the mean alpha has dropped less than this below its initial value (0.002)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and training seed (default 0)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()  # --help answers before the heavy imports
    import lightning.pytorch as pl
    import optuna
    from optuna_integration import PyTorchLightningPruningCallback

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _digits import DigitsCNN, digits_loaders

    from farms_lightning import FARMSCallback

    class AlphaDrop(pl.Callback):
        """Logs ``farms/alpha_drop`` = initial mean alpha - this epoch's, and records the trial's curve."""

        def __init__(self, farms: FARMSCallback, trial: optuna.Trial) -> None:
            self.farms, self.trial = farms, trial

        def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            first, last = self.farms.history[0]["summary"], self.farms.history[-1]["summary"]
            drop = first["alpha_mean"] - last["alpha_mean"]
            pl_module.log("farms/alpha_drop", drop)
            drops = self.trial.user_attrs.get("alpha_drop", []) + [round(drop, 4)]
            self.trial.set_user_attr("alpha_drop", drops)
            self.trial.set_user_attr("epochs", len(drops))

    class AccuracyRecorder(pl.Callback):
        """Records the epoch's validation accuracy (callback_metrics hold it from on_validation_end)."""

        def __init__(self, trial: optuna.Trial) -> None:
            self.trial = trial

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
                self.trial.set_user_attr("val_acc", round(float(trainer.callback_metrics["val_acc"]), 4))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 0.3, log=True)
        batch_size = trial.suggest_categorical("batch_size", [32, 64, 128])
        pl.seed_everything(args.seed, verbose=False)
        farms = FARMSCallback(print_summary=False, log_histogram=False)
        accuracy = AccuracyRecorder(trial)
        trainer = pl.Trainer(
            max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
            callbacks=[farms, AlphaDrop(farms, trial), accuracy,
                       PyTorchLightningPruningCallback(trial, monitor="farms/alpha_drop")])
        train, val, _ = digits_loaders(batch_size=batch_size, seed=args.seed)
        trainer.fit(DigitsCNN(lr=lr, epochs=args.epochs), train, val)
        return float(trainer.callback_metrics["val_acc"])

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed),
                                pruner=optuna.pruners.ThresholdPruner(lower=args.min_drop, n_warmup_steps=1))
    study.optimize(objective, n_trials=args.trials)
    print_table(study, args)


def print_table(study: Any, args: argparse.Namespace) -> None:
    print(f"\nDigitsCNN on digits, up to {args.epochs} epochs per trial, {args.trials} trials (TPE, seed "
          f"{args.seed}); pruned when the mean alpha has dropped < {args.min_drop} below its initial value "
          f"from epoch 2 on\n")
    print("| trial | lr | batch | state | epochs | mean-alpha drop per epoch | val accuracy (last epoch) |")
    print("|---|---|---|---|---|---|---|")
    for t in study.trials:
        drops = ", ".join(f"{d:.4f}" for d in t.user_attrs.get("alpha_drop", []))
        print(f"| {t.number} | {t.params['lr']:.2e} | {t.params['batch_size']} | {t.state.name} | "
              f"{t.user_attrs.get('epochs', 0)} | {drops} | {t.user_attrs.get('val_acc', float('nan')):.4f} |")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    saved = sum(args.epochs - t.user_attrs.get("epochs", 0) for t in pruned)
    print(f"\nbest: trial {study.best_trial.number}, val accuracy {study.best_value:.4f}, "
          f"params {study.best_params}; FARMS pruned {len(pruned)} of {len(study.trials)} trials, "
          f"saving {saved} of {args.epochs * len(study.trials)} epochs")


if __name__ == "__main__":
    main()
