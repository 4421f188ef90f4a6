"""Issue 22, items 8 and 11: tampered or foreign callback states and history files fail where they are
read, with one clear line (a ``ValueError``; exit 3 for ``farms-lightning plot``), never later."""

import copy
import csv
import math
import os

import pytest
import torch

from farms_lightning.cli.commands import main
from farms_lightning.reporting.history import load_history, validate_history


def _entry(stage="epoch", epoch=0, step=4, name="features.0"):
    return {"stage": stage, "epoch": epoch, "step": step, "time_s": 0.5, "summary": {"alpha_mean": 2.5},
            "layers": [{"name": name, "type": "Linear", "shape": [8, 8], "status": "ok", "reason": "",
                        "alpha": 2.5, "alpha_delta": -0.25, "num_evals": 40}]}


GOOD = [_entry("train_start", 0, 0), _entry("epoch", 0, 4), _entry("step", 1, 6)]


def _broken(change):
    history = copy.deepcopy(GOOD)
    change(history)
    return history


#: (id, hostile history, words the one-line error must hold)
HOSTILE_HISTORIES = [
    ("junk", "junk", "not a FARMS history"),
    ("null", None, "got null"),
    ("non-dict entry", [5], "analysis 0 is not an object"),
    ("no layers", _broken(lambda h: h[1].pop("layers")), "lacks 'layers'"),
    ("no stage", _broken(lambda h: h[0].pop("stage")), "lacks 'stage'"),
    ("unknown stage", _broken(lambda h: h[0].update(stage="later")), "stage 'later'"),
    ("layers a number", _broken(lambda h: h[1].update(layers=5)), "layers that are int"),
    ("layers a string", _broken(lambda h: h[1].update(layers="abc")), "layers that are str"),
    ("row without name", _broken(lambda h: h[2]["layers"][0].pop("name")), "no string 'name'"),
    ("row not a dict", _broken(lambda h: h[2]["layers"].append("x")), "layer row 1 is not an object"),
    ("unknown status", _broken(lambda h: h[2]["layers"][0].update(status="great")), "status 'great'"),
    ("epoch NaN", _broken(lambda h: h[1].update(epoch=float("nan"))), "epoch nan"),
    ("step -5", _broken(lambda h: h[1].update(step=-5)), "step -5"),
    ("epoch a bool", _broken(lambda h: h[1].update(epoch=True)), "epoch True"),
    ("alpha a string", _broken(lambda h: h[2]["layers"][0].update(alpha="2.1")), "alpha '2.1'"),
    ("summary a list", _broken(lambda h: h[0].update(summary=[1])), "summary that is list"),
    ("summary value a string", _broken(lambda h: h[0]["summary"].update(alpha_mean="x")), "alpha_mean"),
]


@pytest.fixture(params=HOSTILE_HISTORIES, ids=[case[0] for case in HOSTILE_HISTORIES])
def hostile_history(request):
    return request.param[1], request.param[2]


def test_a_good_history_passes_unchanged():
    assert validate_history(GOOD) == GOOD
    assert validate_history([]) == []


def test_validate_history_names_what_is_wrong_in_one_line(hostile_history):
    history, words = hostile_history
    with pytest.raises(ValueError, match="^the history") as error:
        validate_history(history)
    assert words in str(error.value) and "\n" not in str(error.value)


def _write_json(path, history):
    import json

    path.write_text(json.dumps(history))
    return path


def test_plot_refuses_a_hostile_json_history_with_exit_3(tmp_path, hostile_history, capsys):
    history, words = hostile_history
    source = _write_json(tmp_path / "farms_history.json", history)
    assert main(["plot", str(source), "-o", str(tmp_path / "h.png")]) == 3
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.png").exists()


@pytest.fixture
def hostile_files(tmp_path):
    """History files that crashed or hung ``plot``: deep nesting, a FIFO, a CSV field over 128 KiB,
    a CSV without a status column, a CSV epoch that is not a number."""
    files = {}
    files["deep"] = tmp_path / "deep.json"
    files["deep"].write_text("[" * 1000 + "]" * 1000)
    files["fifo"] = tmp_path / "fifo.json"
    os.mkfifo(files["fifo"])
    header = ["stage", "epoch", "step", "name", "status", "alpha"]
    for key, rows in {"huge": [["epoch", "0", "4", "x" * 200_000, "ok", "2.5"]],
                      "no_status": [["epoch", "0", "4", "l0", "", "2.5"]],
                      "bad_epoch": [["epoch", "zero", "4", "l0", "ok", "2.5"]]}.items():
        files[key] = tmp_path / f"{key}.csv"
        with open(files[key], "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return files


@pytest.mark.parametrize("case, words", [("deep", "nests 1000 levels"), ("fifo", "not a regular file"),
                                         ("huge", "field larger than field limit"),
                                         ("no_status", "status ''"), ("bad_epoch", "not an integer")])
def test_plot_refuses_hostile_files_in_one_line(tmp_path, hostile_files, case, words, capsys):
    assert main(["plot", str(hostile_files[case]), "-o", str(tmp_path / "h.png")]) == 3
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_plot_reads_bare_nan_of_earlier_versions_and_draws_dollar_names(tmp_path):
    pytest.importorskip("matplotlib")
    history = _broken(lambda h: h[2]["layers"][0].update(name="$\\foo{$"))
    source = tmp_path / "farms_history.json"
    source.write_text(__import__("json").dumps(history).replace("-0.25", "NaN"))
    assert load_history(source)[2]["layers"][0]["name"] == "$\\foo{$"
    assert main(["plot", str(source), "-o", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_csv_layer_names_stay_text(tmp_path):
    """A layer named ``0`` (an ``nn.Sequential`` index) is not the number 0 when read back from CSV."""
    from farms_lightning.reporting.history import write_history

    history = [_entry(name="0"), _entry("step", 1, 6, name="")]
    write_history(history, tmp_path / "h.csv")
    names = [row["name"] for h in load_history(tmp_path / "h.csv") for row in h["layers"]]
    assert names == ["0", ""]


# ----------------------------------------------------------------- item 8: callback states on resume
#: (id, a checkpointed callback state, words of the one-line error)
HOSTILE_STATES = [
    ("junk", "junk", "is not this callback's"),
    ("empty state", {}, "is not this callback's"),
    ("null history", {"history": None, "pending": None}, "history is not a FARMS history"),
    ("non-dict entries", {"history": [1, 2], "pending": None}, "analysis 0 is not an object"),
    ("entries without layers", {"history": [{"stage": "epoch", "epoch": 0, "step": 4}], "pending": None},
     "lacks 'layers'"),
    ("pending epoch NaN", {"history": GOOD, "pending": {"epoch": float("nan"), "step": 8}}, "epoch nan"),
    ("pending epoch -5", {"history": GOOD, "pending": {"epoch": -5, "step": 8}}, "epoch -5"),
    ("pending junk", {"history": GOOD, "pending": "soon"}, "pending analysis is 'soon'"),
    ("warm starts junk", {"history": GOOD, "pending": None, "warm_starts": {"fc": "x"}},
     "warm_starts: layer 'fc' holds a str"),
    ("warm starts NaN", {"history": GOOD, "pending": None, "warm_starts": {"fc": [torch.tensor([math.nan])]}},
     "non-finite"),
]


@pytest.fixture(params=HOSTILE_STATES, ids=[case[0] for case in HOSTILE_STATES])
def hostile_state(request):
    return copy.deepcopy(request.param[1]), request.param[2]


@pytest.mark.parametrize("kind", ["FARMSCallback", "FARMSLRBalancer"])
def test_lightning_callbacks_refuse_a_hostile_state_and_keep_their_own(hostile_state, kind):
    import farms_lightning

    state, words = hostile_state
    callback = getattr(farms_lightning, kind)()
    callback.history = [GOOD[0]]
    with pytest.raises(ValueError) as error:
        callback.load_state_dict(state)
    assert words in str(error.value) and kind in str(error.value) and "\n" not in str(error.value)
    assert callback.history == [GOOD[0]] and callback._pending is None  # nothing restored


@pytest.mark.parametrize("factors, words", [("x", "str, not an object"), ({"l1": "2"}, "factor '2'"),
                                            ({"l1": float("nan")}, "factor nan"), ({"l1": -1.0}, "factor -1.0"),
                                            ({"l1": None}, "factor None")])
def test_lr_balancer_refuses_hostile_factors(factors, words):
    from farms_lightning import FARMSLRBalancer

    balancer = FARMSLRBalancer()
    with pytest.raises(ValueError, match="lr_factors") as error:
        balancer.load_state_dict({"history": GOOD, "pending": None, "lr_factors": factors})
    assert words in str(error.value)
    assert balancer.lr_factors == {} and balancer.history == []
    balancer.load_state_dict({"history": GOOD, "pending": {"epoch": 1, "step": 8}, "lr_factors": {"l1": 1.25}})
    assert balancer.lr_factors == {"l1": 1.25} and balancer._pending == {"epoch": 1, "step": 8}


def test_a_tampered_lightning_checkpoint_fails_before_any_step(tmp_path):
    """The whole path: a checkpoint whose callback state lost its rows fails in ``fit`` at restore time."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_helpers import TinyNet, loaders, trainer

    from farms_lightning import FARMSCallback

    pl.seed_everything(0, verbose=False)
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, max_epochs=1, callbacks=[FARMSCallback(), saver]).fit(TinyNet(), *loaders())
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("FARMSCallback")]
    for entry in checkpoint["callbacks"][key]["history"]:
        del entry["layers"]
    torch.save(checkpoint, tmp_path / "tampered.ckpt")

    class CountSteps(pl.Callback):
        steps = 0

        def on_train_batch_end(self, *args):
            CountSteps.steps += 1

    resumed = trainer(tmp_path, max_epochs=2, callbacks=[FARMSCallback(), CountSteps()])
    with pytest.raises(ValueError, match="lacks 'layers'"):
        resumed.fit(TinyNet(), *loaders(), ckpt_path=str(tmp_path / "tampered.ckpt"))
    assert CountSteps.steps == 0
