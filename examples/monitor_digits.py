"""Train a small CNN on scikit-learn's digits with FARMSCallback and a TensorBoardLogger.

Needs: pip install -e ".[digits]"   (from the checkout: scikit-learn, and matplotlib for the heatmap)

Run: python examples/monitor_digits.py [--epochs 10] [--logdir farms_logs] [--heatmap docs/alpha_heatmap.png]
Then: tensorboard --logdir farms_logs   ("Custom Scalars": one chart per metric with every layer;
"Scalars": farms/alpha/<layer>, farms/alpha_mean, ...; "Histograms"; "Images": farms/alpha_heatmap, ESDs)
The run also writes its history (``save_history="json"``) beside the TensorBoard events and prints
where, e.g. farms_logs/digits/version_0/farms_history.json; draw its heatmap again without training:
      farms-lightning plot farms_logs/digits/version_0/farms_history.json -o heatmap.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for the helper module _digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--logdir", default="farms_logs")
    parser.add_argument("--heatmap", help="also save the alpha heatmap of the whole run as this PNG")
    args = parser.parse_args()
    # Imported after the arguments, so that --help answers at once.
    import lightning.pytorch as pl
    from _digits import DigitsCNN, digits_loaders
    from lightning.pytorch.loggers import TensorBoardLogger

    from farms_lightning import FARMSCallback
    from farms_lightning.reporting.history import history_path

    pl.seed_everything(0, verbose=False)
    try:
        import matplotlib  # noqa: F401
        figures = True
    except ImportError:
        figures = False
    farms = FARMSCallback(log_metrics=["alpha", "alpha_weighted", "stable_rank"], log_figures=figures,
                          save_history="json")  # what `farms-lightning plot` reads
    logger = TensorBoardLogger(args.logdir, name="digits")
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[farms], logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=5, accelerator="cpu")
    model = DigitsCNN(epochs=args.epochs)
    train, val, test = digits_loaders()
    trainer.fit(model, train, val)
    result = trainer.test(model, test, verbose=False)[0]
    print(f"\ntest accuracy {result['test_acc']:.3f}")
    print("alpha_mean per analysis:", ", ".join(f"{h['summary']['alpha_mean']:.3f}" for h in farms.history))
    print(f"TensorBoard logs: {os.path.abspath(logger.log_dir)}  (tensorboard --logdir {args.logdir})")
    history_file = history_path(trainer.log_dir, farms.prefix, "json")
    print(f"history: {history_file}  (farms-lightning plot {history_file} -o heatmap.png)")
    if args.heatmap:
        from farms_lightning.reporting.history import heatmap_metric
        from farms_lightning.reporting.plotting import plot_history

        fig, _ = plot_history(farms.history, heatmap_metric(farms.history))  # as farms/alpha_heatmap
        fig.savefig(args.heatmap, dpi=110)
        print(f"heatmap: {args.heatmap}")


if __name__ == "__main__":
    main()
