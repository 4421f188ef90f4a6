"""An Optuna study on scikit-learn's digits where FARMS prunes trials whose weights still look random.

Each trial trains DigitsCNN with a sampled learning rate and batch size and is scored by its
validation accuracy: the tuning objective is accuracy, never alpha. FARMSCallback analyses the
weights at the end of every epoch (before validation, so the pruner sees that epoch's value) and
logs ``farms/alpha_delta_mean``: the mean over fitted layers of alpha minus the layer's own
random-matrix baseline alpha. Near 0 the layers' spectra are what the same shapes give at random;
learned structure pulls it below 0. Optuna's ``ThresholdPruner`` stops a trial once
``farms/alpha_delta_mean`` is above ``-min_drop``, that is, its layers have moved less than
``--min-drop`` below their random baseline. Because the baseline comes with each analysis, no
warm-up epoch is needed to learn a reference: a trial can be pruned at the end of its first epoch.

What it buys, honestly: it stops trials whose weights did not move away from random (a learning
rate far too small, or a diverged run), without validation data and before their accuracy says
so. It does not rank the surviving trials (accuracy does that), and a trial that is pruned might
still have caught up with more epochs. ``--min-drop`` is a threshold on a spectral statistic, not
on accuracy: look at the printed curves before trusting it on another model.

Needs: pip install -e ".[tune]"   (from the checkout)
Run: python examples/tune_optuna.py [--trials 8] [--epochs 4] [--min-drop 0.01] [--warmup-epochs 0] [--seed 0]
Prints one row per trial: parameters, state, epochs run, alpha_delta_mean per epoch, val accuracy;
if every trial was pruned it says so (and exits 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

#: What the pruner reads: the layers' mean distance below their random-matrix baseline alpha.
MONITOR = "farms/alpha_delta_mean"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8, help="number of trials (default 8)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (default 4)")
    parser.add_argument("--min-drop", type=float, default=0.01,
                        help="prune when farms/alpha_delta_mean is above -MIN_DROP: the layers have moved less than "
                             "this below their random-matrix baseline (default 0.01)")
    parser.add_argument("--warmup-epochs", type=int, default=0,
                        help="epochs before pruning may start (default 0: from the end of the first epoch)")
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

    class AlphaDeltaRecorder(pl.Callback):
        """Records the trial's ``farms/alpha_delta_mean`` per epoch (FARMSCallback logged it before validation)."""

        def __init__(self, trial: optuna.Trial) -> None:
            self.trial = trial

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking or MONITOR not in trainer.callback_metrics:
                return
            deltas = self.trial.user_attrs.get("alpha_delta", []) + [round(float(trainer.callback_metrics[MONITOR]), 4)]
            self.trial.set_user_attr("alpha_delta", deltas)
            self.trial.set_user_attr("epochs", len(deltas))

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
        # No analysis before training: the pruner needs only each epoch's value against its baseline.
        farms = FARMSCallback(print_summary=False, log_histogram=False, analyze_on_train_start=False)
        trainer = pl.Trainer(
            max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
            callbacks=[farms, AlphaDeltaRecorder(trial), AccuracyRecorder(trial),
                       PyTorchLightningPruningCallback(trial, monitor=MONITOR)])
        train, val, _ = digits_loaders(batch_size=batch_size, seed=args.seed)
        trainer.fit(DigitsCNN(lr=lr, epochs=args.epochs), train, val)
        return float(trainer.callback_metrics["val_acc"])

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna's step is Lightning's epoch index: step 0 is the end of the first epoch.
    pruner = optuna.pruners.ThresholdPruner(upper=-args.min_drop, n_warmup_steps=args.warmup_epochs)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed),
                                pruner=pruner)
    study.optimize(objective, n_trials=args.trials)
    print_table(study, args)


def print_table(study: Any, args: argparse.Namespace) -> None:
    print(f"\nDigitsCNN on digits, up to {args.epochs} epochs per trial, {args.trials} trials (TPE, seed "
          f"{args.seed}); pruned when {MONITOR} > {-args.min_drop} from epoch {args.warmup_epochs} on "
          "(0-based)\n")
    print("| trial | lr | batch | state | epochs | alpha_delta_mean per epoch | val accuracy (last epoch) |")
    print("|---|---|---|---|---|---|---|")
    for t in study.trials:
        deltas = ", ".join(f"{d:+.4f}" for d in t.user_attrs.get("alpha_delta", []))
        print(f"| {t.number} | {t.params['lr']:.2e} | {t.params['batch_size']} | {t.state.name} | "
              f"{t.user_attrs.get('epochs', 0)} | {deltas} | {t.user_attrs.get('val_acc', float('nan')):.4f} |")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    saved = sum(args.epochs - t.user_attrs.get("epochs", 0) for t in pruned)
    savings = (f"FARMS pruned {len(pruned)} of {len(study.trials)} trials, saving {saved} of "
               f"{args.epochs * len(study.trials)} epochs")
    if not any(t.state.name == "COMPLETE" for t in study.trials):  # study.best_trial would raise ValueError
        print(f"\nno best trial: every trial was pruned ({savings}); lower --min-drop or raise --warmup-epochs")
        return
    print(f"\nbest: trial {study.best_trial.number}, val accuracy {study.best_value:.4f}, "
          f"params {study.best_params}; {savings}")


if __name__ == "__main__":
    main()
