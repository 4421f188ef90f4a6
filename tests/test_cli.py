"""The ``farms-lightning`` command line on real files: outputs equal the library's, errors give exit codes."""

import argparse
import csv
import io
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import heavy_tailed
from lightning_helpers import TinyNet, loaders, trainer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from farms_lightning import analyze
from farms_lightning.cli.commands import main
from farms_lightning.models.state_dict import model_from_state_dict
from farms_lightning.policies.pruning import alpha_sparsity


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "enc.0.weight": heavy_tailed(300, 200, seed=1), "enc.0.bias": torch.randn(300),
        "enc.1.weight": heavy_tailed(200, 300, seed=2, df=3.0), "head.weight": heavy_tailed(10, 200, seed=3),
        "conv.weight": torch.randn(16, 8, 3, 3), "norm.weight": torch.ones(200), "step": torch.tensor(5),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = TinyNet()
    fit = trainer(root, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    fit.fit(model, loaders()[0])
    fit.save_checkpoint(root / "tiny.ckpt")
    sd = state_dict()
    torch.save(sd, root / "sd.pt")
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=0.1)}, root / "pickled.pth")
    save_file(sd, root / "sd.safetensors", metadata={"format": "pt", "note": "kept"})
    (root / "shards").mkdir()
    save_file({k: v for k, v in sd.items() if k.startswith("enc")}, root / "shards" / "model-1.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("enc")}, root / "shards" / "model-2.safetensors")
    (root / "shards" / "config.json").write_text('{"hidden": 200}')
    (root / "shards" / "1_Pooling").mkdir()
    (root / "shards" / "1_Pooling" / "config.json").write_text('{"mean": true}')
    (root / "torch_shards").mkdir()
    torch.save({k: v for k, v in sd.items() if k.startswith("enc")}, root / "torch_shards" / "model-1.bin")
    torch.save({k: v for k, v in sd.items() if not k.startswith("enc")}, root / "torch_shards" / "model-2.bin")
    (root / "torch_shards" / "config.json").write_text('{"hidden": 200}')
    (root / "trunc.pt").write_bytes((root / "sd.pt").read_bytes()[:400])
    (root / "trunc.safetensors").write_bytes((root / "sd.safetensors").read_bytes()[:400])
    (root / "junk.ckpt").write_text("not a checkpoint\n" * 10)
    torch.save({"norm.weight": torch.ones(5), "step": torch.tensor(1)}, root / "nomat.pt")
    (root / "empty").mkdir()
    return root, model, sd


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def alphas_of(rows):
    return {row["name"]: row["alpha"] for row in rows}


@pytest.mark.parametrize("source", ["tiny.ckpt", "sd.pt", "sd.safetensors", "shards", "torch_shards",
                                    "pickled.pth"])
def test_analyze_json_equals_analyze(files, capsys, source):
    root, model, sd = files
    extra = ["--trust-pickle"] if source == "pickled.pth" else []
    code, out, err = run(["analyze", root / source, "--format", "json", *extra], capsys)
    assert code == 0 and err == ""  # no progress bar outside a terminal
    data = json.loads(out)
    expected = analyze(model if source == "tiny.ckpt" else model_from_state_dict(sd))
    assert alphas_of(data["layers"]) == {s.name: s.alpha for s in expected.layers}
    assert {r["name"]: r["status"] for r in data["layers"]} == {s.name: s.status for s in expected.layers}
    assert "too_small" in {s.status for s in expected.layers}  # the 10-row head
    assert data["summary"]["num_fitted"] == expected.summary["num_fitted"] and data["settings"]["fit"] == "median"


def test_engine_options_reach_the_analysis(files, capsys, tmp_path):
    root, _, sd = files
    options = dict(window=50, aspect_ratio=2.0, windows_per_dim=3, fit="peak", min_eigenvalues=5,
                   peak_bound="corrected", dtype=torch.float64)
    code, _, _ = run(["analyze", root / "sd.pt", "--window", 50, "--aspect-ratio", 2, "--windows-per-dim", 3,
                      "--fit", "peak", "--min-eigenvalues", 5, "--peak-bound", "corrected", "--dtype", "float64",
                      "--include", "enc.*", "head", "--exclude", "enc.1", "--output", tmp_path / "a.json"], capsys)
    assert code == 0
    expected = analyze(model_from_state_dict(sd), include=["enc.*", "head"], exclude="enc.1", **options)
    written = alphas_of(json.loads((tmp_path / "a.json").read_text())["layers"])
    assert {k: v for k, v in written.items() if v is not None} == expected.alphas and "head" in written
    code, _, _ = run(["analyze", root / "sd.pt", "--esd", "full", "--layer-types", "Conv2d,Linear", "-o",
                      tmp_path / "b.json"], capsys)
    written = alphas_of(json.loads((tmp_path / "b.json").read_text())["layers"])
    assert {k: v for k, v in written.items() if v is not None} == analyze(model_from_state_dict(sd), esd="full").alphas


def test_table_csv_and_markdown(files, capsys, tmp_path):
    root, _, _ = files
    report = analyze(model_from_state_dict(load_file(root / "sd.safetensors")))  # keys sorted by the file
    code, out, _ = run(["analyze", root / "sd.safetensors"], capsys)
    assert code == 0 and report.to_table() in out and "esd=farms m=100 Q=1.0 k=9 fit=median" in out
    code, _, _ = run(["analyze", root / "sd.safetensors", "-o", tmp_path / "r.csv"], capsys)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["name"] for r in rows] == list(report) and rows[1]["shape"] == "300x200"
    assert {r["name"]: float(r["alpha"]) for r in rows if r["alpha"]} == report.alphas
    code, out, _ = run(["analyze", root / "sd.safetensors", "--format", "markdown"], capsys)
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0] == "| name | type | shape | alpha | alpha_random | alpha_delta | D | num_evals | status |"
    assert len(lines) == 2 + len(report)
    assert f"| enc.0 | Linear | 300x200 | {report['enc.0'].alpha:.4g} |" in out


def test_no_random_baseline_flag(files, capsys):
    root, _, sd = files
    code, out, _ = run(["analyze", root / "sd.pt", "--format", "json"], capsys)
    layers = json.loads(out)["layers"]
    expected = analyze(model_from_state_dict(sd))
    assert code == 0 and [r["alpha_delta"] for r in layers] == [s.alpha_delta for s in expected.layers]
    assert any(r["alpha_delta"] is not None for r in layers)
    code, out, _ = run(["analyze", root / "sd.pt", "--format", "json", "--no-random-baseline"], capsys)
    data = json.loads(out)
    assert code == 0 and data["settings"]["random_baseline"] is False
    assert all(r["alpha_random"] is None and r["alpha_delta"] is None for r in data["layers"])
    assert alphas_of(data["layers"]) == expected.alphas | {s.name: None for s in expected.layers if s.alpha is None}
    code, out, _ = run(["analyze", root / "sd.pt", "--no-random-baseline", "--format", "markdown"], capsys)
    assert "| name | type | shape | alpha | D | num_evals | status |" in out


def test_prune_checkpoint_by_alpha(files, capsys, tmp_path):
    root, model, _ = files
    out_path = tmp_path / "pruned.ckpt"
    code, out, _ = run(["prune", root / "tiny.ckpt", "--sparsity", 0.6, "--format", "json", "-o", out_path], capsys)
    assert code == 0
    targets = alpha_sparsity(analyze(model, preset="llm"), 0.6)
    original = torch.load(root / "tiny.ckpt", weights_only=True)
    pruned = torch.load(out_path, weights_only=True)
    assert pruned["global_step"] == original["global_step"] and pruned["loops"] == original["loops"]
    report = json.loads(out)
    assert {r["name"]: r["target"] for r in report["layers"]} == targets
    for key, value in original["state_dict"].items():
        name = key.removesuffix(".weight")
        if name in targets:
            zeros = int((pruned["state_dict"][key] == 0).sum())
            assert zeros == round(targets[name] * value.numel()), key
            assert torch.equal(pruned["state_dict"][key][value.abs() > value.abs().flatten().kthvalue(zeros).values],
                               value[value.abs() > value.abs().flatten().kthvalue(zeros).values])
        else:
            assert torch.equal(pruned["state_dict"][key], value), key
    assert report["achieved"] == pytest.approx(0.6, abs=1e-4)


def test_prune_safetensors_uniform_keeps_metadata_and_other_tensors(files, capsys, tmp_path):
    root, _, sd = files
    code, out, _ = run(["prune", root / "sd.safetensors", "--sparsity", 0.5, "--allocation", "uniform",
                        "-o", tmp_path / "p.safetensors"], capsys)
    assert code == 0 and "uniform allocation: sparsity 0.5000" in out
    pruned = load_file(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    for key in ("enc.0.weight", "enc.1.weight", "head.weight", "conv.weight"):
        assert int((pruned[key] == 0).sum()) == round(0.5 * sd[key].numel())
    for key in ("enc.0.bias", "norm.weight", "step"):
        assert torch.equal(pruned[key], sd[key])


def test_prune_folder_and_state_dict(files, capsys, tmp_path):
    root, _, sd = files
    code, _, _ = run(["prune", root / "shards", "--sparsity", 0.4, "--esd", "full", "--blocks", "enc",
                      "-o", tmp_path / "out"], capsys)
    assert code == 0 and (tmp_path / "out" / "config.json").read_text() == '{"hidden": 200}'
    assert (tmp_path / "out" / "1_Pooling" / "config.json").read_text() == '{"mean": true}'
    targets = alpha_sparsity(analyze(model_from_state_dict(sd), "llm", esd="full"), 0.4, blocks="enc")
    assert targets["enc.0"] == targets["enc.1"]
    shard = load_file(tmp_path / "out" / "model-1.safetensors")
    assert set(shard) == {"enc.0.weight", "enc.0.bias", "enc.1.weight"}
    assert int((shard["enc.1.weight"] == 0).sum()) == round(targets["enc.1"] * 60000)
    code, _, _ = run(["prune", root / "torch_shards", "--sparsity", 0.4, "--esd", "full", "--blocks", "enc",
                      "-o", tmp_path / "out_torch"], capsys)
    assert code == 0 and (tmp_path / "out_torch" / "config.json").read_text() == '{"hidden": 200}'
    torch_shard = torch.load(tmp_path / "out_torch" / "model-1.bin", weights_only=True)
    assert torch.equal(torch_shard["enc.1.weight"], shard["enc.1.weight"])  # the same pruning as the safetensors
    assert torch.equal(torch.load(root / "torch_shards" / "model-1.bin", weights_only=True)["enc.1.weight"],
                       sd["enc.1.weight"])  # the input is untouched
    code, _, _ = run(["prune", root / "sd.pt", "--sparsity", 0.3, "--include", "head", "-o", tmp_path / "h.pt"],
                     capsys)
    pruned = torch.load(tmp_path / "h.pt", weights_only=True)
    assert int((pruned["head.weight"] == 0).sum()) == 600 and torch.equal(pruned["enc.0.weight"], sd["enc.0.weight"])


@pytest.mark.parametrize("argv,code,message", [
    (["analyze", "trunc.pt"], 3, "truncated or corrupt"),
    (["analyze", "trunc.safetensors"], 3, "truncated or corrupt"),
    (["analyze", "junk.ckpt"], 3, "unknown format"),
    (["analyze", "missing.pt"], 3, "no such file"),
    (["analyze", "empty"], 3, "without .safetensors or torch"),
    (["analyze", "pickled.pth"], 3, "--trust-pickle"),
    (["analyze", "nomat.pt"], 4, "no weight matrices"),
    (["analyze", "sd.pt", "--include", "nothing*"], 4, "no layer"),
    (["analyze", "sd.pt", "--window", "1"], 2, "--window must be"),
    (["analyze", "sd.pt", "--layer-types", "Dense"], 2, "--layer-types"),
    (["analyze", "sd.pt", "--fit", "best"], 2, "invalid choice"),
    (["prune", "sd.pt", "--sparsity", "0.5", "--method", "wanda", "-o", "x.pt"], 2, "forward pass"),
    (["prune", "sd.pt", "--sparsity", "1.2", "-o", "x.pt"], 2, "--sparsity must be"),
    (["prune", "sd.pt", "--sparsity", "0.5", "--epsilon", "1", "-o", "x.pt"], 2, "--epsilon must be"),
    (["prune", "sd.pt", "--sparsity", "0.5", "-o", "sd.pt"], 2, "the input"),
    (["prune", "sd.pt", "--sparsity", "0.5"], 2, "--output"),
    (["prune", "sd.pt", "--sparsity", "0.5", "-o", "no/such/dir/x.pt"], 5, "cannot write"),
    (["analyze", "sd.pt", "-o", "no/such/dir/r.json"], 5, "cannot write"),
])
def test_errors_and_exit_codes(files, capsys, monkeypatch, argv, code, message):
    monkeypatch.chdir(files[0])
    got, out, err = run(argv, capsys)
    assert got == code and message in err and out == ""
    assert not (files[0] / "x.pt").exists()


@pytest.mark.slow
def test_console_script(files, tmp_path):
    """The installed entry point, a few runs at once (each process spends seconds importing Lightning)."""
    if shutil.which("farms-lightning") is None:
        pytest.fail("the farms-lightning console script is missing: pip install -e . --no-deps")
    root, model, sd = files
    commands = {
        "json": (["analyze", root / "tiny.ckpt", "--format", "json"], 0),
        "prune": (["prune", root / "sd.safetensors", "--sparsity", "0.5", "-o", tmp_path / "p.safetensors"], 0),
        "junk": (["analyze", root / "junk.ckpt"], 3),
        "nothing": (["analyze", root / "nomat.pt"], 4),
    }
    # One thread each: four processes at once would oversubscribe the cores (OpenMP threads spin-wait).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {k: subprocess.Popen(["farms-lightning", *map(str, argv)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env) for k, (argv, _) in commands.items()}
    results = {k: (p.communicate(timeout=300), p.returncode) for k, p in running.items()}
    results = {k: (code, out, err) for k, ((out, err), code) in results.items()}
    for key, (code, out, err) in results.items():
        assert code == commands[key][1], (key, err)
        assert "Traceback" not in err
        assert (err == "") == (code == 0), (key, err)
    assert alphas_of(json.loads(results["json"][1])["layers"]) == {s.name: s.alpha for s in analyze(model).layers}
    targets = alpha_sparsity(analyze(model_from_state_dict(sd), "llm"), 0.5)
    pruned = load_file(tmp_path / "p.safetensors")
    assert all(int((pruned[f"{n}.weight"] == 0).sum()) == round(s * sd[f"{n}.weight"].numel())
               for n, s in targets.items())
