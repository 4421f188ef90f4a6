import csv
import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_helpers import TinyNet, WeightSnapshots, loaders, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from farms_lightning import FARMSCallback, analyze
from farms_lightning.files import strict_json


def _fit(tmp_path, callbacks, epochs=2, seed=0, ckpt_path=None, with_val=True, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = TinyNet()
    train, val = loaders()
    t = trainer(tmp_path, max_epochs=epochs, callbacks=callbacks, **kwargs)
    t.fit(model, train, val if with_val else None, ckpt_path=ckpt_path)
    return t, model


def test_tensorboard_scalars_equal_analyze_of_each_epochs_weights(tmp_path):
    farms = FARMSCallback(log_figures=True, log_histogram=True)
    snaps = WeightSnapshots()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    t, model = _fit(tmp_path, [farms, snaps], epochs=3, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0}).Reload()
    tags = events.Tags()
    reference_model = TinyNet()
    layer_names = [s.name for s in analyze(model).layers]
    assert len(snaps.snapshots) == 4 and len(farms.history) == 4  # before training + 3 epochs
    for step, state in snaps.snapshots:
        step = max(0, step - 1)  # Lightning logs epoch-end values at the epoch's last step index
        reference_model.load_state_dict(state)
        expected = analyze(reference_model)
        for name in layer_names:
            if expected[name].status != "ok":
                continue
            points = {e.step: e.value for e in events.Scalars(f"farms/alpha/{name}")}
            assert points[step] == pytest.approx(expected[name].alpha, rel=1e-6), (name, step)
        mean = {e.step: e.value for e in events.Scalars("farms/alpha_mean")}
        assert mean[step] == pytest.approx(expected.summary["alpha_mean"], rel=1e-6)
    assert "farms/alpha_histogram" in tags["histograms"]
    histogram_steps = [e.step for e in events.Histograms("farms/alpha_histogram")]
    assert histogram_steps == [e.step for e in events.Scalars("farms/alpha_mean")] == [0, 3, 7, 11]
    assert {"farms/esd", "farms/alpha_per_layer"} <= set(tags["images"])
    assert "farms/time_s" in tags["scalars"]
    # The same values are monitorable.
    assert float(t.callback_metrics["farms/alpha_mean"]) == pytest.approx(farms.history[-1]["summary"]["alpha_mean"],
                                                                         rel=1e-6)


def _comparable(history):
    # As JSON text: NaN summary values ("not assessed") restored from a checkpoint are new float objects.
    return [json.dumps({k: v for k, v in entry.items() if k != "time_s"}, sort_keys=True) for entry in history]


@pytest.mark.parametrize("with_val", [True, False])
def test_resumed_history_equals_uninterrupted_run(tmp_path, with_val):
    full = FARMSCallback()
    _fit(tmp_path / "full", [full], epochs=4, with_val=with_val)
    first = FARMSCallback()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _fit(tmp_path / "part", [first, checkpoint], epochs=2, with_val=with_val)
    resumed = FARMSCallback()
    _fit(tmp_path / "part", [resumed], epochs=4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), with_val=with_val)
    assert [(h["stage"], h["epoch"], h["step"]) for h in resumed.history] == [
        ("train_start", 0, 0), ("epoch", 0, 4), ("epoch", 1, 8), ("epoch", 2, 12), ("epoch", 3, 16)]
    assert _comparable(resumed.history) == _comparable(full.history)


def _lambda_max_values(history):
    return [(h["stage"], h["epoch"], row["name"], row["lambda_max"]) for h in history for row in h["layers"]]


def test_resumed_lambda_max_equals_uninterrupted_run_bit_for_bit(tmp_path):
    """Each lambda_max starts from the last analysis's vectors; the checkpoint carries them."""
    full = FARMSCallback(matrix_metrics=True)
    _fit(tmp_path / "full", [full], epochs=2)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    part = FARMSCallback(matrix_metrics=True)
    _fit(tmp_path / "part", [part, checkpoint], epochs=1)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("FARMSCallback")]
    # A vector per layer with a lambda_max; head.0 and head.2 (smaller sides 160 and 120) by Lanczos.
    solved = {row["name"] for row in part.history[-1]["layers"] if row["lambda_max"] is not None}
    assert set(saved["callbacks"][key]["warm_starts"]) == solved >= {"head.0", "head.2"}
    resumed = FARMSCallback(matrix_metrics=True)
    _fit(tmp_path / "part", [resumed], epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    values = _lambda_max_values(full.history)
    assert [v[:2] for v in values[::5]] == [("train_start", 0), ("epoch", 0), ("epoch", 1)]
    assert all(v[3] is not None for v in values if v[2] in ("head.0", "head.2"))
    assert _lambda_max_values(resumed.history) == values  # float equality: the same bits
    assert _comparable(resumed.history) == _comparable(full.history)
    # Without the vectors (a checkpoint of an earlier version) the resumed run starts cold: the same
    # values to 1e-7, not the same bits; so the equality above is the warm starts' doing.
    del saved["callbacks"][key]["warm_starts"]
    torch.save(saved, tmp_path / "old.ckpt")
    cold = FARMSCallback(matrix_metrics=True)
    _fit(tmp_path / "old", [cold], epochs=2, ckpt_path=str(tmp_path / "old.ckpt"))
    last = [v for v in _lambda_max_values(cold.history) if v[:2] == ("epoch", 1) and v[3] is not None]
    expected = [v for v in values if v[:2] == ("epoch", 1) and v[3] is not None]
    assert [v[3] for v in last] == pytest.approx([v[3] for v in expected], rel=2e-7)
    assert last != expected


def test_whole_matrix_metrics_are_computed_only_when_asked(tmp_path):
    default, asked = FARMSCallback(), FARMSCallback(log_metrics=("alpha", "alpha_weighted"), prefix="asked")
    t, model = _fit(tmp_path, [default, asked], epochs=1, logger=CSVLogger(str(tmp_path), name="csv"))
    assert not default.matrix_metrics and asked.matrix_metrics
    rows = default.history[-1]["layers"]
    assert all(row["lambda_max"] is None and row["alpha_weighted"] is None and row["stable_rank"] is None
               for row in rows)
    assert math.isnan(default.history[-1]["summary"]["alpha_weighted_mean"])
    assert "farms/alpha_weighted_mean" not in t.callback_metrics and "farms/alpha_mean" in t.callback_metrics
    assert default.state_dict()["warm_starts"] == {}
    expected = analyze(model)  # the functional analysis keeps computing them
    assert float(t.callback_metrics["asked/alpha_weighted_mean"]) == pytest.approx(
        expected.summary["alpha_weighted_mean"], rel=1e-6)
    assert float(t.callback_metrics["asked/alpha_weighted/head.0"]) == pytest.approx(
        expected["head.0"].alpha_weighted, rel=1e-6)
    solved = {row["name"] for row in asked.history[-1]["layers"] if row["lambda_max"] is not None}
    assert set(asked.state_dict()["warm_starts"]) == solved >= {"head.0", "head.2"}
    with open(os.path.join(t.loggers[0].log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "farms/alpha_weighted_mean" not in header and "asked/alpha_weighted_mean" in header
    with pytest.raises(ValueError, match="matrix_metrics"):
        FARMSCallback(matrix_metrics="yes")  # type: ignore[arg-type]


def test_farms_metric_drives_early_stopping(tmp_path):
    stop = EarlyStopping(monitor="farms/alpha_mean", mode="max", stopping_threshold=1.0, check_on_train_epoch_end=True)
    # EarlyStopping listed first: Lightning runs monitoring callbacks after the others at epoch end.
    t, _ = _fit(tmp_path, [stop, FARMSCallback()], epochs=6, with_val=False)
    assert t.current_epoch == 1 and stop.stopped_epoch == 0
    assert t.callback_metrics["farms/alpha_mean"] > 1.0


def test_callback_does_not_change_training(tmp_path):
    _, plain = _fit(tmp_path / "a", [], epochs=2)
    _, watched = _fit(tmp_path / "b", [FARMSCallback(every_n_steps=3, log_figures=True)], epochs=2)
    for (k, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in watched.parameters())


def test_bad_layers_warn_and_training_continues(tmp_path):
    class Poisoned(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.spare.weight[0, 0] = math.nan

    def build():
        model = TinyNet()
        model.spare = torch.nn.Linear(64, 64)  # not in forward(): NaN here does not stop training
        model.tiny = torch.nn.Linear(3, 3)
        return model

    pl.seed_everything(0, verbose=False)
    farms = FARMSCallback(analyze_on_train_start=False)
    t = trainer(tmp_path, max_epochs=3, callbacks=[farms, Poisoned()])
    with pytest.warns(UserWarning) as caught:
        t.fit(build(), *loaders())
    messages = [str(w.message) for w in caught]
    assert any("'tiny' skipped: too small" in m for m in messages)
    assert any("'spare' skipped: non-finite weights" in m for m in messages)
    assert sum("'tiny'" in m for m in messages) == 1  # warned once, not every epoch
    rows = {h["epoch"]: {r["name"]: r for r in h["layers"]} for h in farms.history}
    assert rows[0]["spare"]["status"] == "ok" and rows[1]["spare"]["reason"] == "non-finite weights"
    assert t.current_epoch == 3 and len(farms.history) == 3


def test_step_schedule_and_history_files(tmp_path):
    farms = FARMSCallback(every_n_steps=3, every_n_epochs=None, analyze_on_train_start=False, save_history="json")
    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(tmp_path, [farms], epochs=2, logger=logger)
    assert [(h["stage"], h["step"]) for h in farms.history] == [("step", 3), ("step", 6)]
    with open(os.path.join(logger.log_dir, "farms_history.json")) as f:
        assert json.load(f) == json.loads(strict_json.dumps(farms.history))  # strict JSON: null for NaN
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "farms/alpha/head.2" in header and "farms/alpha_mean" in header


def test_no_logger_warns_and_keeps_history(tmp_path):
    farms = FARMSCallback(save_history="csv")
    with pytest.warns(UserWarning, match="no logger"):
        t, _ = _fit(tmp_path, [farms], epochs=1, logger=False)
    assert len(farms.history) == 2 and "farms/alpha_mean" in t.callback_metrics
    assert os.path.exists(os.path.join(str(tmp_path), "farms_history.csv"))


def test_bad_arguments_and_unsupported_strategies():
    for kwargs, name in [({"fit": "x"}, "fit"), ({"window": 0}, "window"), ({"every_n_epochs": -1}, "every_n_epochs"),
                         ({"log_metrics": ["beta"]}, "log_metrics"), ({"save_history": "xml"}, "save_history"),
                         ({"dtype": "int8"}, "dtype"), ({"random_baseline": 1}, "random_baseline"),
                         ({"random_baseline": False, "log_metrics": ["alpha_delta"]}, "random_baseline")]:
        with pytest.raises(ValueError, match=name):
            FARMSCallback(**kwargs)

    class FSDPStrategy:  # stands in for Lightning's; only its name matters here
        pass

    class FakeTrainer:
        strategy = FSDPStrategy()
        loggers = []

    with pytest.raises(MisconfigurationException, match="FSDP"):
        FARMSCallback().setup(FakeTrainer(), None, "fit")  # type: ignore[arg-type]


def test_state_dict_round_trip_and_state_key():
    a = FARMSCallback(fit="peak")
    a.history.append({"stage": "epoch", "epoch": 0, "step": 4, "time_s": 0.1, "summary": {}, "layers": []})
    b = FARMSCallback(fit="peak")
    b.load_state_dict(a.state_dict())
    assert b.history == a.history
    vectors = {"fc": [torch.randn(5, dtype=torch.float64)]}
    a._warm_starts = vectors
    b.load_state_dict(a.state_dict())
    assert b._warm_starts.keys() == vectors.keys() and torch.equal(b._warm_starts["fc"][0], vectors["fc"][0])
    b.load_state_dict({"history": a.history, "pending": None})  # a checkpoint of an earlier version
    assert b._warm_starts == {}
    assert FARMSCallback(fit="median").state_key != a.state_key


def test_alpha_delta_is_logged_when_asked(tmp_path):
    farms = FARMSCallback(log_metrics=("alpha", "alpha_delta"))
    logger = CSVLogger(str(tmp_path), name="csv")
    t, model = _fit(tmp_path, [farms], epochs=1, logger=logger)
    expected = analyze(model)  # the last analysis saw the final weights
    for name, stats in expected.items():
        if stats.alpha_delta is not None:
            assert float(t.callback_metrics[f"farms/alpha_delta/{name}"]) == pytest.approx(stats.alpha_delta, rel=1e-6)
    assert float(t.callback_metrics["farms/alpha_random_mean"]) == pytest.approx(expected.summary["alpha_random_mean"])
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        assert "farms/alpha_delta/head.2" in f.readline()
    plain = FARMSCallback(random_baseline=False)
    t, _ = _fit(tmp_path / "plain", [plain], epochs=1)
    assert not any("alpha_delta" in k or "alpha_random" in k or "trained" in k for k in t.callback_metrics)
    assert plain.history[-1]["layers"][-1]["alpha_random"] is None


def test_the_analysis_before_training_has_an_epoch_in_metrics_csv(tmp_path):
    """A CSVLogger row of the analysis before training names its epoch (0), like every other row."""
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path, name="csv")
    t = pl.Trainer(max_epochs=1, logger=logger, callbacks=[FARMSCallback()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0)
    t.fit(TinyNet(), *loaders())
    with open(logger.log_dir + "/metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    farms_rows = [row for row in rows if row.get("farms/alpha_mean")]
    assert len(farms_rows) == 2  # before training and at the end of epoch 0
    (initial,) = [row for row in farms_rows if row["step"] == "0"]
    assert initial["epoch"] != "", initial
    assert float(initial["epoch"]) == 0
