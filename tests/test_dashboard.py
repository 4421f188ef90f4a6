"""What users look at: the TensorBoard layout and heatmap read back from the event files, monitors that
see the current epoch (Optuna's pruner, weight averaging), figures for other loggers."""

import io
import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
import optuna
import pytest
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.loggers import CometLogger, CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning_helpers import TinyNet, WeightSnapshots, loaders, trainer
from optuna_integration import PyTorchLightningPruningCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from farms_lightning import FARMSCallback, analyze
from farms_lightning.files import strict_json
from farms_lightning.reporting.plotting import plot_history
from farms_lightning.training.dashboard import log_figure


def _fit(tmp_path, callbacks, epochs=2, logger=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    t = trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, logger=logger if logger is not None else False,
                **kwargs)
    t.fit(model, *loaders())
    return t, model


def _layout(events):
    raw = events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout()
    layout.ParseFromString(raw)
    return {c.title: {chart.title: list(chart.multiline.tag) for chart in c.chart} for c in layout.category}


def _layer_runs(log_dir, prefix="farms"):
    """Every per-layer run's events, by layer name (the sub-folders of ``<prefix>_by_layer``)."""
    folder = Path(log_dir) / f"{prefix}_by_layer"
    return {run.name: EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
            for run in sorted(folder.iterdir())}


def test_layout_heatmap_and_steps_read_back_from_tensorboard(tmp_path):
    main = FARMSCallback(log_metrics=["alpha", "stable_rank"], log_figures=True, save_history="json")
    full = FARMSCallback(esd="full", prefix="farms_full", log_histogram=False, save_history="csv",
                         print_summary=False)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _, model = _fit(tmp_path, [main, full], logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    names = [s.name for s in analyze(model).layers]  # model order: features.0, features.2, head.0, ...
    assert names == ["features.0", "features.2", "head.0", "head.2", "head.4"]
    layout = _layout(events)
    # One merged layout: the second callback's category was added, not written over the first.
    assert list(layout) == ["farms", "farms_full"]
    # Per-layer charts draw the per-layer runs: one line (colour, name) per layer.
    assert layout["farms"]["alpha by layer"] == [f"^{re.escape('farms_by_layer/alpha')}$"]
    assert layout["farms"]["stable_rank by layer"] == [f"^{re.escape('farms_by_layer/stable_rank')}$"]
    assert layout["farms_full"]["alpha by layer"] == [f"^{re.escape('farms_full_by_layer/alpha')}$"]
    # The summary is grouped by scale: alpha values, alpha_delta values, counts, each apart.
    assert layout["farms"]["alpha (summary)"] == ["^farms/alpha_mean$", "^farms/alpha_median$",
                                                  "^farms/alpha_random_mean$"]
    assert layout["farms"]["alpha_delta (summary)"] == ["^farms/alpha_delta_mean$", "^farms/alpha_delta_median$"]
    assert layout["farms"]["alpha_weighted_mean"] == ["^farms/alpha_weighted_mean$"]
    assert "^farms/num_fitted$" in layout["farms"]["layer counts"]
    assert "^farms/num_looks_random$" in layout["farms"]["layer counts"]
    # features.0 (degenerate) is never fitted and head.4 (10x10 windows) too small: neither has a run.
    runs = _layer_runs(logger.log_dir)
    assert list(runs) == ["features.2", "head.0", "head.2"]
    for name, run in runs.items():
        assert sorted(run.Tags()["scalars"]) == ["farms_by_layer/alpha", "farms_by_layer/stable_rank"]
        # The same values as the main run's per-layer scalars, at the same steps.
        main_points = [(e.step, e.value) for e in events.Scalars(f"farms/alpha/{name}")]
        assert [(e.step, e.value) for e in run.Scalars("farms_by_layer/alpha")] == main_points
    assert list(_layer_runs(logger.log_dir, "farms_full")) == ["features.2", "head.0", "head.2"]
    # Every charted tag is a logged scalar, in the main run or in the per-layer runs.
    layer_runs = [*runs.values(), *_layer_runs(logger.log_dir, "farms_full").values()]
    scalars = set(events.Tags()["scalars"]).union(*(run.Tags()["scalars"] for run in layer_runs))
    for group in layout.values():
        for tags in group.values():
            for tag in tags:
                assert tag.strip("^$").replace("\\", "") in scalars, tag
    # The heatmap is logged at every analysis, at the scalars' steps.
    steps = [e.step for e in events.Scalars("farms/alpha_mean")]
    assert steps == [0, 3, 7] and [e.step for e in events.Scalars("farms_full/alpha_mean")] == steps
    images = events.Images("farms/alpha_heatmap")
    assert [e.step for e in images] == steps
    picture = plt.imread(io.BytesIO(images[-1].encoded_image_string), format="png")
    assert picture.shape[0] == images[-1].height > 100 and picture.shape[1] == images[-1].width > 100
    # The heatmap is on by default (matplotlib is installed); ESD figures only with log_figures.
    assert "farms_full/alpha_heatmap" in events.Tags()["images"] and "farms_full/esd" not in events.Tags()["images"]
    # History files are named by prefix; the full-ESD alphas differ from the FARMS ones.
    with open(f"{logger.log_dir}/farms_history.json") as f:
        assert json.load(f) == json.loads(strict_json.dumps(main.history))  # NaN written as null
    assert (tmp_path / "tb" / "version_0" / "farms_full_history.csv").exists()
    assert main.history[-1]["summary"]["alpha_mean"] != full.history[-1]["summary"]["alpha_mean"]


def test_heatmap_cells_are_the_history_values(tmp_path):
    farms = FARMSCallback(every_n_steps=3)
    _fit(tmp_path, [farms])
    fig, ax = plot_history(farms.history)
    cells = np.ma.filled(ax.images[0].get_array(), np.nan)
    assert cells.shape == (5, len(farms.history)) == (5, 5)  # init, s3, e0, s6, e1
    for j, entry in enumerate(farms.history):
        for i, row in enumerate(entry["layers"]):
            assert (np.isnan(cells[i, j]) and row["alpha"] is None) or cells[i, j] == row["alpha"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["init", "s3", "e0", "s6", "e1"]
    assert ax.get_xlabel() and ax.get_ylabel().startswith("layer (model order")
    assert [t.get_text() for t in ax.get_yticklabels()] == [r["name"] for r in farms.history[0]["layers"]]
    plt.close(fig)
    with pytest.raises(ValueError, match="not in the history"):
        plot_history(farms.history, metric="beta")
    with pytest.raises(ValueError, match="empty"):
        plot_history([])


def _trial_values(tmp_path, callbacks_of):
    seen = {}

    def objective(trial):
        callbacks = callbacks_of(trial)
        seen["callbacks"] = list(callbacks)
        _fit(tmp_path / str(trial.number), callbacks, epochs=3)
        return 0.0

    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.optimize(objective, n_trials=1)
    return study.trials[0].intermediate_values, seen["callbacks"]


def test_optuna_pruner_records_each_epochs_own_analysis(tmp_path):
    # The pruning callback comes first: order does not matter, the analysis precedes validation.
    values, (_, farms) = _trial_values(tmp_path, lambda trial: [
        PyTorchLightningPruningCallback(trial, monitor="farms/alpha_mean"), FARMSCallback()])
    epochs = {h["epoch"]: h["summary"]["alpha_mean"] for h in farms.history if h["stage"] == "epoch"}
    assert sorted(values) == sorted(epochs) == [0, 1, 2]
    for epoch, value in values.items():
        assert value == pytest.approx(epochs[epoch], rel=1e-6), epoch  # logged as float32
    initial = farms.history[0]["summary"]["alpha_mean"]
    assert all(abs(v - initial) > 1e-6 * initial for v in values.values())  # never the value before training


class AveragedSnapshot(pl.Callback):
    """The weights validation sees, after weight averaging swapped its average in."""

    def __init__(self):
        self.states = []

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def test_epoch_analysis_uses_the_trained_weights_not_the_swapped_average(tmp_path):
    farms, snaps, averaged = FARMSCallback(analyze_on_train_start=False), WeightSnapshots(), AveragedSnapshot()
    # The averaging callback runs first: it swaps weights in on_validation_epoch_start, after our analysis.
    _fit(tmp_path, [WeightAveraging(), farms, snaps, averaged], epochs=2, num_sanity_val_steps=0)
    reference = TinyNet()
    assert len(farms.history) == 2 and len(averaged.states) == 2
    for entry, (_, trained), average in zip(farms.history, snaps.snapshots[1:], averaged.states):
        reference.load_state_dict(trained)
        assert entry["summary"]["alpha_mean"] == pytest.approx(analyze(reference).summary["alpha_mean"], rel=1e-12)
        reference.load_state_dict(average)
        assert entry["summary"]["alpha_mean"] != pytest.approx(analyze(reference).summary["alpha_mean"], rel=1e-6)


def test_epochs_without_validation_are_analysed_at_epoch_end(tmp_path):
    farms = FARMSCallback(analyze_on_train_start=False)
    _fit(tmp_path, [farms], epochs=3, check_val_every_n_epoch=2)  # validation only ends epoch 1
    assert [(h["stage"], h["epoch"], h["step"]) for h in farms.history] == [
        ("epoch", 0, 4), ("epoch", 1, 8), ("epoch", 2, 12)]


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def _bare(cls, **attributes):
    """A logger of ``cls`` without its service (not installed here): records what it is sent."""
    logger = object.__new__(type(cls.__name__, (cls,), {"experiment": None, "run_id": None}))
    for key, value in attributes.items():
        setattr(logger, key, value)
    return logger


def test_figures_go_to_every_logger_that_takes_images(tmp_path):
    mlflow, comet = Recorder(), Recorder()
    wandb = _bare(WandbLogger)
    wandb.images = []
    wandb.log_image = lambda key, images, step: wandb.images.append((key, images, step))
    loggers = [_bare(MLFlowLogger, experiment=mlflow, run_id="run1"), wandb,
               _bare(CometLogger, experiment=comet), CSVLogger(str(tmp_path))]
    fig = plt.figure()
    reached = log_figure(loggers, "farms/alpha_heatmap", fig, 7)
    assert reached == ["MLFlowLogger", "WandbLogger", "CometLogger"]
    assert mlflow.calls == [("log_figure", ("run1", fig, "farms/alpha_heatmap/step_000007.png"), {})]
    assert wandb.images == [("farms/alpha_heatmap", [fig], 7)]
    assert comet.calls == [("log_figure", (), {"figure_name": "farms/alpha_heatmap", "figure": fig, "step": 7})]
    assert not plt.fignum_exists(fig.number)  # closed once sent


def test_two_callbacks_with_different_prefixes_log_side_by_side(tmp_path):
    a, b = FARMSCallback(), FARMSCallback(prefix="farms_peak", fit="peak", print_summary=False)
    t, _ = _fit(tmp_path, [a, b], epochs=1)
    assert a.state_key != b.state_key
    assert float(t.callback_metrics["farms/alpha_mean"]) == pytest.approx(a.history[-1]["summary"]["alpha_mean"])
    assert float(t.callback_metrics["farms_peak/alpha_mean"]) == pytest.approx(
        b.history[-1]["summary"]["alpha_mean"])
    assert torch.is_tensor(t.callback_metrics["farms_peak/time_s"])


def _saved_history(tmp_path):
    """Two real analyses (initial weights, then perturbed ones) saved as JSON and CSV."""
    from farms_lightning.reporting.history import history_entry, write_history

    torch.manual_seed(0)
    model = TinyNet()
    history = [history_entry(analyze(model), "train_start", 0, 0, 0.1)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    history.append(history_entry(analyze(model), "epoch", 0, 4, 0.1))
    write_history(history, tmp_path / "farms_history.json")
    write_history(history, tmp_path / "farms_history.csv")
    return history


def test_plot_command_writes_the_heatmap_and_never_over_its_input(tmp_path, capsys):
    from farms_lightning.cli.commands import main
    from farms_lightning.reporting.history import history_matrix, load_history

    history = _saved_history(tmp_path)
    source = tmp_path / "farms_history.json"
    before = source.read_bytes()
    assert main(["plot", str(source), "-o", str(tmp_path / "heatmap.png")]) == 0
    picture = plt.imread(tmp_path / "heatmap.png")
    assert picture.ndim == 3 and min(picture.shape[:2]) > 100
    # The CSV history gives the same matrix as the JSON one (and as the history itself).
    assert history_matrix(load_history(tmp_path / "farms_history.csv")) == history_matrix(history)
    assert main(["plot", str(tmp_path / "farms_history.csv"), "-o", str(tmp_path / "h.svg"), "--metric",
                 "stable_rank"]) == 0
    assert (tmp_path / "h.svg").read_text().lstrip().startswith("<?xml")
    assert main(["plot", str(source), "-o", str(source)]) == 2
    assert main(["plot", str(source), "-o", str(tmp_path / "x.png"), "--metric", "beta"]) == 2
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert main(["plot", str(tmp_path / "other.json"), "-o", str(tmp_path / "y.png")]) == 3
    assert main(["plot", str(source), "-o", str(tmp_path / "missing" / "z.png")]) == 5
    assert source.read_bytes() == before
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".farms-tmp-")]
    assert "refusing" in capsys.readouterr().err


class TwoClassNet(TinyNet):
    """TinyNet with a 2-row classification head, as every binary fine-tune has."""

    def __init__(self) -> None:
        super().__init__()
        self.head[-1] = torch.nn.Linear(120, 2)

    def training_step(self, batch, batch_idx):
        return super().training_step((batch[0], batch[1] % 2), batch_idx)

    def validation_step(self, batch, batch_idx):
        return super().validation_step((batch[0], batch[1] % 2), batch_idx)


def test_the_default_callback_shows_alpha_delta_in_tensorboard(tmp_path):
    """FARMSCallback() with Lightning's default TensorBoardLogger, read back with TensorBoard's own loader."""
    pl.seed_everything(0, verbose=False)
    model, farms = TwoClassNet(), FARMSCallback()
    t = trainer(tmp_path, max_epochs=2, callbacks=[farms], logger=True)
    assert isinstance(t.logger, TensorBoardLogger)  # Lightning's default logger
    t.fit(model, *loaders())
    events = EventAccumulator(t.logger.log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    report = farms.last_report
    judged = [s.name for s in report.layers if s.status == "ok"]
    assert judged == ["features.2", "head.0", "head.2"]
    # The 2-row head is reported as too small, with its reason, and is in no summary value.
    head = report["head.4"]
    assert head.status == "too_small" and "2x2 windows" in head.reason and head.alpha is None
    assert report.summary["num_too_small"] == 1 and report.summary["num_fitted"] == 3
    assert not any(tag.endswith("/head.4") for tag in scalars)
    fitted = [report[n] for n in judged]
    assert report.summary["alpha_mean"] == pytest.approx(np.mean([s.alpha for s in fitted]), rel=1e-12)
    assert report.summary["alpha_delta_mean"] == pytest.approx(np.mean([s.alpha_delta for s in fitted]), rel=1e-12)
    # Per layer: alpha and alpha_delta; the summary's alpha_delta_mean; at init and after epochs 0 and 1.
    for name in judged:
        assert {f"farms/alpha/{name}", f"farms/alpha_delta/{name}"} <= scalars
        points = [e.value for e in events.Scalars(f"farms/alpha_delta/{name}")]
        assert points == pytest.approx([h_row["alpha_delta"] for h in farms.history for h_row in h["layers"]
                                        if h_row["name"] == name], rel=1e-6)
    means = [e.value for e in events.Scalars("farms/alpha_delta_mean")]
    assert means == pytest.approx([h["summary"]["alpha_delta_mean"] for h in farms.history], rel=1e-6)
    assert len(means) == 3 and "farms/num_looks_random" in scalars
    assert "farms/num_under_trained" not in scalars  # NaN (not assessed) outside full-ESD ks fits: not logged
    # No whole-matrix metric is logged by default, so none is computed: alpha_weighted_mean is NaN, in no
    # scalar and in no chart of the layout.
    assert "farms/alpha_weighted_mean" not in scalars and math.isnan(report.summary["alpha_weighted_mean"])
    assert all(row["lambda_max"] is None for h in farms.history for row in h["layers"])
    charted = [tag for group in _layout(events).values() for tags in group.values() for tag in tags]
    assert charted and not any("alpha_weighted" in tag for tag in charted)
    # The heatmap image, by default, at every analysis; no histogram of a handful of values.
    assert len(events.Images("farms/alpha_heatmap")) == 3 and events.Tags()["histograms"] == []
    # Per-layer runs, one per judged layer, each drawing its own alpha_delta line.
    runs = _layer_runs(t.logger.log_dir)
    assert list(runs) == judged
    assert all(len(run.Scalars("farms_by_layer/alpha_delta")) == 3 for run in runs.values())
