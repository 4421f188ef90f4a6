"""TempBalance on scikit-learn's digits: the schedule alone vs TempBalance on full ESDs vs on FARMS.

Run: python examples/tempbalance_digits.py [--seeds 3] [--epochs 10] [--lr-min 0.5 --lr-max 1.5]
Prints a markdown table of final test accuracy (mean ± std over seeds).
Needs: pip install -e ".[digits]"   (from the checkout)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def run(mode: str, seed: int, epochs: int, lr_min: float, lr_max: float) -> float:
    # Imported here, not at the top, so that --help answers at once.
    import lightning.pytorch as pl
    from _digits import DigitsCNN, digits_loaders

    from farms_lightning import FARMSLRBalancer

    pl.seed_everything(seed, verbose=False)
    callbacks = []
    if mode != "schedule only":
        esd = "full" if "full" in mode else "farms"
        callbacks.append(FARMSLRBalancer(esd=esd, lr_min_ratio=lr_min, lr_max_ratio=lr_max, print_summary=False,
                                         log_histogram=False, log_lr=False))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True)
    model = DigitsCNN(epochs=epochs, per_layer_groups=True)
    train, _, test = digits_loaders(seed=seed)
    trainer.fit(model, train)
    return trainer.test(model, test, verbose=False)[0]["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr-min", type=float, default=0.5)
    parser.add_argument("--lr-max", type=float, default=1.5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    modes = ["schedule only", "TempBalance, full ESD", "TempBalance, FARMS"]
    results = {m: [run(m, seed, args.epochs, args.lr_min, args.lr_max) for seed in range(args.seeds)] for m in modes}
    print(f"\nDigitsCNN on digits, {args.epochs} epochs, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine schedule, "
          f"batch 64, (lr_min_ratio, lr_max_ratio) = ({args.lr_min}, {args.lr_max}), seeds 0..{args.seeds - 1}\n")
    print("| training | test accuracy (mean ± std) | per seed |")
    print("|---|---|---|")
    for mode, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {mode} | {100 * statistics.fmean(accs):.2f} ± {100 * std:.2f} % | "
              f"{', '.join(f'{100 * a:.2f}' for a in accs)} |")


if __name__ == "__main__":
    main()
