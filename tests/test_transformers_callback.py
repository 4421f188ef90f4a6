"""FARMSTrainerCallback in a real Hugging Face Trainer: a tiny BERT from a config, random data, one epoch."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from farms_lightning import analyze, farms_param_groups  # noqa: E402
from farms_lightning.integrations.transformers import FARMSTrainerCallback  # noqa: E402

STEPS = 8


class RandomText(torch.utils.data.Dataset):
    def __init__(self, n: int = 8 * STEPS, length: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 200, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32)
    return BertForSequenceClassification(config)


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1, logging_steps=2,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


@pytest.mark.slow
def test_values_merge_into_the_trainers_logs_without_losing_any(tmp_path):
    model = tiny_bert()
    farms = FARMSTrainerCallback(every_n_steps=4, log_metrics=["alpha", "stable_rank"], save_history="json")
    trainer = Trainer(model=model, args=_args(tmp_path, report_to=["tensorboard"]), train_dataset=RandomText(),
                      callbacks=[farms])
    assert trainer.callback_handler.callbacks[0] is farms  # moved before the TensorBoard integration
    trainer.train()
    history = trainer.state.log_history
    # Every loss log is there, at every logging step, and so is the final summary log.
    assert [h["step"] for h in history if "loss" in h] == [2, 4, 6, 8]
    assert all("learning_rate" in h and "grad_norm" in h for h in history if "loss" in h)
    assert "train_runtime" in history[-1]
    # Analyses: before training, after steps 4 and 8, and at the epoch end (after step 8).
    assert [(h["stage"], h["step"]) for h in farms.history] == [("train_start", 0), ("step", 4), ("step", 8),
                                                                ("epoch", 8)]
    by_step = {h["step"]: h for h in history if "loss" in h}
    # Values are held until the next log: the initial analysis reaches the log of step 2.
    assert by_step[2]["farms/alpha_mean"] == farms.history[0]["summary"]["alpha_mean"]
    assert "farms/alpha_mean" not in by_step[6]
    for log, entry in ((by_step[4], farms.history[1]), (by_step[8], farms.history[2]), (history[-1], farms.history[3])):
        assert log["farms/alpha_mean"] == entry["summary"]["alpha_mean"]
        assert log["farms/time_s"] == entry["time_s"]
    # The last analysis (epoch end) equals an independent analysis of the trained model.
    final = analyze(model)
    for stats in final.layers:
        if stats.alpha is not None:
            assert history[-1][f"farms/alpha/{stats.name}"] == pytest.approx(stats.alpha, rel=1e-12)
            assert history[-1][f"farms/stable_rank/{stats.name}"] == pytest.approx(stats.stable_rank, rel=1e-12)
    # The report_to integration (TensorBoard) received the merged values with the losses.
    import glob

    folder = glob.glob(f"{tmp_path}/runs/*")[0]
    events = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    # Steps 2, 4, 8 and the final summary log (also at step 8), which carries the epoch-end analysis.
    assert [e.step for e in events.Scalars("train/farms/alpha_mean")] == [2, 4, 8, 8]
    assert (tmp_path / "farms_history.json").exists()


def _printed_logs(text: str) -> list[dict]:
    """The log dicts the Trainer's printer (``PrinterCallback``, or ``ProgressCallback`` via tqdm) wrote."""
    import ast

    return [ast.literal_eval(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("disable_tqdm", [True, False], ids=["PrinterCallback", "ProgressCallback"])
def test_the_console_line_carries_the_summary_and_the_loggers_every_layer(tmp_path, capsys, disable_tqdm):
    farms = FARMSTrainerCallback(every_n_steps=4, every_n_epochs=None)
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, report_to=["tensorboard"], disable_tqdm=disable_tqdm),
                      train_dataset=RandomText(), callbacks=[farms])
    capsys.readouterr()
    trainer.train()
    printed = [log for log in _printed_logs(capsys.readouterr().out) if "loss" in log]
    assert len(printed) == 4  # steps 2, 4, 6, 8
    farms_logs = [log for log in printed if "farms/alpha_mean" in log]
    assert len(farms_logs) == 3  # the initial analysis (log of step 2) and steps 4 and 8
    for log in farms_logs:
        assert "farms/time_s" in log and "farms/num_fitted" in log
        assert not [key for key in log if key.startswith("farms/alpha/")], log
    # state.log_history and the TensorBoard integration have every layer's alpha.
    layers = [r["name"] for r in farms.history[-1]["layers"] if r["status"] == "ok"]
    assert len(layers) > 5
    history = [h for h in trainer.state.log_history if "farms/alpha_mean" in h]
    assert len(history) == 3
    for log in history:
        assert all(f"farms/alpha/{name}" in log for name in layers)
    import glob

    events = EventAccumulator(glob.glob(f"{tmp_path}/runs/*")[0], size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars(f"train/farms/alpha/{layers[0]}")] == [2, 4, 8]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]


@pytest.mark.slow
def test_print_layers_prints_every_layer(tmp_path, capsys):
    farms = FARMSTrainerCallback(every_n_steps=None, every_n_epochs=None, print_layers=True)
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, max_steps=2), train_dataset=RandomText(),
                      callbacks=[farms])
    capsys.readouterr()
    trainer.train()
    (printed,) = [log for log in _printed_logs(capsys.readouterr().out) if "farms/alpha_mean" in log]
    layers = [r["name"] for r in farms.history[0]["layers"] if r["status"] == "ok"]
    assert all(f"farms/alpha/{name}" in printed for name in layers)


class RecordingAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used: list[list[float]] = []

    def step(self, closure=None):
        self.used.append([group["lr"] for group in self.param_groups])
        return super().step(closure)


class ScheduledLR(TrainerCallback):
    """The LR the Trainer's scheduler gives each group, read before the step."""

    def __init__(self, optimizer):
        self.optimizer, self.scheduled = optimizer, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.scheduled.append([group["lr"] for group in self.optimizer.param_groups])


@pytest.mark.slow
def test_tempbalance_with_one_param_group_per_layer(tmp_path):
    model = tiny_bert()
    optimizer = RecordingAdamW(farms_param_groups(model, lr=1e-3, weight_decay=0.01))
    farms = FARMSTrainerCallback(every_n_steps=2, every_n_epochs=None, lr_balance=True, lr_min_ratio=0.2,
                                 lr_max_ratio=1.8)
    scheduled = ScheduledLR(optimizer)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=RandomText(), callbacks=[scheduled],
                      optimizers=(optimizer, None))
    trainer.add_callback(farms)  # added after the Trainer's init: it moves itself first in on_train_begin
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no mixed-group warning with per-layer groups
        warnings.filterwarnings("ignore", message="(?!FARMS)")
        trainer.train()
    assert trainer.callback_handler.callbacks[0] is farms
    assert len(optimizer.used) == len(scheduled.scheduled) == STEPS
    names = [g["name"] for g in optimizer.param_groups]
    for entry in farms.history:
        # Factors are TempBalance's linear map of the fitted alphas, first and last layer left out; the
        # 2-class head (too small to judge) keeps its place as the last layer, untuned.
        ordered = [r for r in entry["layers"] if r["status"] in ("ok", "too_small")]
        assert ordered[-1]["status"] == "too_small"
        fitted = [r for r in ordered[1:-1] if r["status"] == "ok"]
        alphas = {r["name"]: r["alpha"] for r in fitted}
        low, high = min(alphas.values()), max(alphas.values())
        assert entry["lr_factors"] == pytest.approx({n: 0.2 + 1.6 * (a - low) / (high - low) for n, a in alphas.items()})
    for step, (used, lrs) in enumerate(zip(optimizer.used, scheduled.scheduled)):
        factors = farms.history[step // 2]["lr_factors"]  # the latest analysis before this step
        for name, lr_used, lr in zip(names, used, lrs):
            assert lr_used == lr * factors.get(name, 1.0), (step, name)
    assert len({round(f, 6) for f in farms.history[-1]["lr_factors"].values()}) > 2


def test_bad_arguments():
    for kwargs, name in [({"fit": "x"}, "fit"), ({"every_n_steps": -1}, "every_n_steps"),
                         ({"log_metrics": ["beta"]}, "log_metrics"), ({"save_history": "xml"}, "save_history"),
                         ({"wndow": 3}, "engine option"), ({"lr_balance": True, "lr_min_ratio": 2.0}, "lr_min_ratio")]:
        with pytest.raises(ValueError, match=name):
            FARMSTrainerCallback(**kwargs)


# ----------------------------------------------------------------- resume from a checkpoint (issue 22, items 5, 8)
RESUME_STEPS = 12


class StopAt(TrainerCallback):
    """Ends training after ``step`` (the checkpoint of that step is saved first): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resumable_run(folder, stop_at=None, resume=None, restore_flag=False):
    model = tiny_bert()
    optimizer = RecordingAdamW(farms_param_groups(model, lr=1e-3, weight_decay=0.01))
    farms = FARMSTrainerCallback(every_n_steps=4, lr_balance=True, save_history="json")
    args = _args(folder, save_strategy="steps", save_steps=10, logging_steps=11,
                 restore_callback_states_from_checkpoint=restore_flag)
    trainer = Trainer(model=model, args=args, train_dataset=RandomText(8 * RESUME_STEPS),
                      callbacks=[farms] + ([StopAt(stop_at)] if stop_at else []), optimizers=(optimizer, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, farms, optimizer


def _without_time(history):
    return [{k: v for k, v in entry.items() if k != "time_s"} for entry in history]


def _history_file(folder):
    import json

    from farms_lightning.files.strict_json import finite

    return _without_time(finite(json.loads((folder / "farms_history.json").read_text())))


@pytest.mark.slow
@pytest.mark.parametrize("restore_flag", [False, True], ids=["default", "restore_callback_states"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, restore_flag):
    from farms_lightning.files.strict_json import finite

    full_trainer, full, full_optimizer = _resumable_run(tmp_path / "full")
    _, first, _ = _resumable_run(tmp_path / "part", stop_at=10)
    assert (tmp_path / "part" / "checkpoint-10").is_dir() and first.history[-1]["step"] == 10  # went on past the save
    trainer, resumed, optimizer = _resumable_run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-10"),
                                                 restore_flag=restore_flag)
    assert any(cb is resumed for cb in trainer.callback_handler.callbacks)  # the user's handle is the live one
    steps = [(h["stage"], h["step"]) for h in full.history]
    assert steps == [("train_start", 0), ("step", 4), ("step", 8), ("step", 12), ("epoch", 12)]
    assert [(h["stage"], h["step"]) for h in resumed.history] == steps
    assert _without_time(finite(resumed.history)) == _without_time(finite(full.history))
    assert resumed.lr_factors == full.lr_factors and len(set(resumed.lr_factors.values())) > 2
    # The LRs the optimizer used at steps 11 and 12: the factors of the analysis at step 8, not 1.
    assert optimizer.used == full_optimizer.used[10:]
    assert optimizer.used != [[g["lr"] for g in optimizer.param_groups]] * 2
    assert _history_file(tmp_path / "part") == _history_file(tmp_path / "full")
    # The values of the analyses after the checkpoint reach the same logs as in the uninterrupted run.
    def farms_logs(t):
        return [{k: v for k, v in log.items() if k.startswith("farms/") and k != "farms/time_s"}
                for log in t.state.log_history if log.get("step", 0) > 10]

    # The log of step 11 carries the analysis of step 8, pending at the checkpoint (logs every 11 steps).
    assert farms_logs(trainer) == farms_logs(full_trainer)
    assert farms_logs(trainer)[0]["farms/alpha_mean"] == full.history[2]["summary"]["alpha_mean"]


def _saved_entry(**changes):
    from farms_lightning.engine.analysis import resolve_settings
    from farms_lightning.integrations.trainer_state import CallbackState, export_state

    history = [{"stage": "step", "epoch": 0, "step": 4, "time_s": 0.1, "summary": {"alpha_mean": float("nan")},
                "layers": [{"name": "l1", "status": "ok", "alpha": 2.0}]}]
    entry = export_state(CallbackState(history, {"l1": 1.2}, {"farms/alpha_mean": 2.0}, set()), resolve_settings("cv"))
    import json

    value = json.loads(entry["json"])
    value.update(changes)
    return {**entry, "json": json.dumps(value)}


#: (id, a hostile stateful_callbacks entry, words of the one-line error)
HOSTILE_HF_STATES = [
    ("junk", "junk", "not this callback's state"),
    ("another format", {"format": "x/9", "json": "{}"}, "not this callback's state"),
    ("deep", {"format": "farms_lightning.FARMSTrainerCallback/1", "json": "[" * 1000 + "]" * 1000}, "nests 1000"),
    ("empty", {"format": "farms_lightning.FARMSTrainerCallback/1", "json": "{}"}, "expected the fields"),
    ("null history", _saved_entry(history=None), "got null"),
    ("non-dict entries", _saved_entry(history=[1]), "analysis 0 is not an object"),
    ("no layers", _saved_entry(history=[{"stage": "step", "epoch": 0, "step": 4}]), "lacks 'layers'"),
    ("step -5", _saved_entry(history=[{"stage": "step", "epoch": 0, "step": -5, "layers": []}]), "step -5"),
    ("bad factor", _saved_entry(lr_factors={"l1": "big"}), "factor 'big'"),
    ("bad pending", _saved_entry(pending={"k": "v"}), "pending values"),
    ("other settings", _saved_entry(settings={"preset": "llm"}), "other analysis settings"),
]


@pytest.fixture(params=HOSTILE_HF_STATES, ids=[case[0] for case in HOSTILE_HF_STATES])
def hostile_hf_state(request):
    return request.param[1], request.param[2]


def test_import_state_refuses_hostile_entries_in_one_line(hostile_hf_state):
    from farms_lightning.engine.analysis import resolve_settings
    from farms_lightning.integrations.trainer_state import import_state

    entry, words = hostile_hf_state
    with pytest.raises(ValueError, match="^the state") as error:
        import_state(entry, "the state", resolve_settings("cv"), 10)
    assert words in str(error.value) and "\n" not in str(error.value)
    restored = import_state(_saved_entry(), "the state", resolve_settings("cv", dtype="float64"), 10)
    assert restored.lr_factors == {"l1": 1.2} and restored.history[0]["summary"] == {"alpha_mean": None}
    assert import_state(_saved_entry(), "the state", resolve_settings("cv"), 3).history == []  # rewound


@pytest.mark.slow
def test_a_tampered_trainer_checkpoint_fails_before_any_step_and_keeps_the_history_file(tmp_path):
    import json

    _resumable_run(tmp_path, stop_at=10)
    state_file = tmp_path / "checkpoint-10" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stateful_callbacks"]["FARMSTrainerCallback:farms"] = HOSTILE_HF_STATES[6][1]  # entries without layers
    state_file.write_text(json.dumps(state))
    before = (tmp_path / "farms_history.json").read_bytes()
    with pytest.raises(ValueError, match="lacks 'layers'"):
        _resumable_run(tmp_path, resume=str(state_file.parent))
    assert (tmp_path / "farms_history.json").read_bytes() == before


def test_whole_matrix_metrics_only_when_logged_and_warm_starts_stay_out_of_the_trainer_state(tmp_path):
    """The callback's own analysis step, called as the Trainer calls it (no training needed)."""
    import json
    import math
    from types import SimpleNamespace

    from farms_lightning.files import strict_json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 120))
    args = SimpleNamespace(output_dir=str(tmp_path))
    for log_metrics, computed in ((("alpha",), False), (("alpha", "lambda_max"), True)):
        farms = FARMSTrainerCallback(log_metrics=log_metrics, random_baseline=False)
        state = SimpleNamespace(global_step=0, epoch=0.0, stateful_callbacks={}, is_world_process_zero=True)
        assert farms.matrix_metrics is computed
        for step in (0, 4):
            state.global_step = step
            with torch.no_grad():
                model[0].weight.mul_(1.01)
            farms._run(args, state, model, "step", 0)
            expected = analyze(model, random_baseline=False)
            for row in farms.history[-1]["layers"]:
                if computed:
                    assert row["lambda_max"] == pytest.approx(expected[row["name"]].lambda_max, rel=1e-7)
                else:
                    assert row["lambda_max"] is None and row["alpha_weighted"] is None
        assert ("farms/alpha_weighted_mean" in farms._pending) is computed
        assert ("farms/lambda_max/0" in farms._pending) is computed
        assert math.isnan(farms.history[-1]["summary"]["alpha_weighted_mean"]) is not computed
        assert sorted(farms._warm_starts) == (["0", "2"] if computed else [])
        # The checkpointed state is JSON and holds no vector (a resumed run starts lambda_max cold).
        saved = strict_json.dumps(state.stateful_callbacks)
        assert "warm" not in saved and json.loads(saved)
