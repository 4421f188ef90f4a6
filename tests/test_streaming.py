"""Streaming CLI: the same reports and pruned files as the in-memory path; ties by key; device, memory
bound and cache options."""

import json
import shutil

import pytest
import torch
from conftest import heavy_tailed
from safetensors.torch import save_file, save_model

from farms_lightning import analyze
from farms_lightning.cli import cli_distributed, streaming
from farms_lightning.cli.commands import _jsonable, main
from farms_lightning.cli.weight_files import load_weights, save_weights
from farms_lightning.models.state_dict import model_from_state_dict
from farms_lightning.policies.pruners import prune_model
from farms_lightning.policies.pruning import alpha_sparsity, uniform_sparsity


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "enc.0.weight": heavy_tailed(300, 200, seed=seed + 1), "enc.0.bias": torch.randn(300),
        "enc.1.weight": heavy_tailed(200, 300, seed=seed + 2, df=3.0),
        "head.weight": heavy_tailed(64, 200, seed=seed + 3).to(torch.bfloat16),
        "conv.weight": torch.randn(16, 8, 3, 3), "norm.weight": torch.ones(200), "step": torch.tensor(5),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    sd = state_dict()
    torch.save(sd, root / "sd.pt")
    save_file(sd, root / "sd.safetensors", metadata={"format": "pt"})
    for kind in ("shards", "torch_shards"):
        (root / kind).mkdir()
        (root / kind / "config.json").write_text("{}")
        parts = [{k: v for k, v in sd.items() if k.startswith("enc")}, {k: v for k, v in sd.items() if not k.startswith("enc")}]
        for i, part in enumerate(parts):
            if kind == "shards":
                save_file(part, root / kind / f"model-{i}.safetensors")
            else:
                torch.save(part, root / kind / f"model-{i}.bin")
    # Tied weights: one torch file storing the table once for two keys, and safetensors' alias metadata.
    table = heavy_tailed(256, 128, seed=7)
    tied = {"embed.weight": table, "mid.weight": heavy_tailed(128, 128, seed=8), "lm_head.weight": table}
    torch.save(tied, root / "tied.pt")
    model = model_from_state_dict({k: v.clone() for k, v in tied.items() if k != "lm_head.weight"})
    model.lm_head = model.embed  # the same module under a second name, as a tied model holds it
    save_model(model, str(root / "tied.safetensors"))
    return root


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def in_memory_rows(path, **options):
    report = analyze(model_from_state_dict(load_weights(path).state_dict), **options)
    return json.loads(json.dumps(_jsonable(report.to_rows()), allow_nan=False))


@pytest.mark.parametrize("source", ["sd.pt", "sd.safetensors", "shards", "torch_shards", "tied.pt",
                                    "tied.safetensors"])
def test_streaming_analysis_equals_the_in_memory_one(root, capsys, source):
    code, out, _ = run(["analyze", root / source, "--format", "json", "--preset", "llm", "--layer-types",
                        "Linear,Conv2d,Embedding"], capsys)
    data = json.loads(out)
    assert code == 0 and data["settings"]["world_size"] == 1 and data["settings"]["device"] == "cpu"
    expected = in_memory_rows(root / source, preset="llm", layer_types=["Linear", "Conv2d", "Embedding"])
    assert data["layers"] == expected  # every statistic, exactly
    if source.startswith("tied"):  # the tie is found by key (torch: one file's storage; safetensors: alias)
        reasons = {row["name"]: row["reason"] for row in data["layers"]}
        shared = [name for name, why in reasons.items() if why.startswith("shares weights with")]
        assert len(shared) == 1 and reasons[shared[0]] == f"shares weights with {({'embed', 'lm_head'} - set(shared)).pop()}"


@pytest.mark.parametrize("allocation", ["alpha", "uniform"])
@pytest.mark.parametrize("source, output", [("sd.pt", "p.pt"), ("sd.safetensors", "p.safetensors"),
                                            ("shards", "p"), ("torch_shards", "p"), ("tied.pt", "t.pt"),
                                            ("tied.safetensors", "t.safetensors")])
def test_streaming_prune_writes_the_in_memory_files(root, capsys, tmp_path, source, output, allocation):
    code, out, _ = run(["prune", root / source, "--sparsity", 0.6, "--allocation", allocation, "--format", "json",
                        "-o", tmp_path / output], capsys)
    assert code == 0
    weights = load_weights(root / source)  # the in-memory path, as the Python API runs it
    model = model_from_state_dict(weights.state_dict)
    report = analyze(model, preset="llm")
    sparsities = alpha_sparsity(report, 0.6) if allocation == "alpha" else uniform_sparsity(report, 0.6)
    achieved = prune_model(model, sparsities)
    save_weights(weights, tmp_path / "expected")
    rows = json.loads(out)["layers"]
    assert {r["name"]: r["achieved"] for r in rows} == achieved and {r["name"]: r["target"] for r in rows} == \
        {name: sparsities[name] for name in achieved}
    files = sorted(p.name for p in (tmp_path / "expected").iterdir()) if (tmp_path / "expected").is_dir() else [""]
    for name in files:
        got, want = (tmp_path / output / name, tmp_path / "expected" / name) if name else \
            (tmp_path / output, tmp_path / "expected")
        if got.suffix == ".safetensors" or (not name and source.endswith("safetensors")):
            assert got.read_bytes() == want.read_bytes()  # byte for byte
        elif name != "config.json":
            a, b = torch.load(got), torch.load(want)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if source == "tied.pt":  # the tie survives: pruning the owner pruned both keys
        pruned = torch.load(tmp_path / output)
        assert pruned["embed.weight"].untyped_storage().data_ptr() == pruned["lm_head.weight"].untyped_storage().data_ptr()


def test_device_errors_are_one_line_usage_errors(root, capsys):
    code, _, err = run(["analyze", root / "sd.pt", "--device", "tpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device must be cpu, cuda or cuda:N" in err
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):
            code, _, err = run(["prune", root / "sd.pt", "--sparsity", 0.5, "-o", root / "x.pt", "--device", device],
                               capsys)
            assert code == 2 and err.count("\n") == 1 and "CUDA is not available" in err
        assert not (root / "x.pt").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_analysis_matches_cpu(root, capsys):
    _, cpu, _ = run(["analyze", root / "shards", "--format", "json", "--device", "cpu"], capsys)
    code, gpu, _ = run(["analyze", root / "shards", "--format", "json", "--device", "cuda", "--max-memory", "1GiB"],
                       capsys)
    assert code == 0 and json.loads(gpu)["settings"]["device"].startswith("cuda")
    for a, b in zip(json.loads(cpu)["layers"], json.loads(gpu)["layers"]):
        assert a["status"] == b["status"] and (a["alpha"] is None or abs(a["alpha"] - b["alpha"]) < 1e-6 * a["alpha"])


def test_sizes_and_the_memory_bound(root, capsys):
    assert [cli_distributed.parse_size(s) for s in ("8GiB", "512MiB", "1.5GB", "100")] == \
        [8 << 30, 512 << 20, 1_500_000_000, 100]
    code, _, err = run(["analyze", root / "sd.pt", "--max-memory", "8 parsecs"], capsys)
    assert code == 2 and "not a size" in err and err.count("\n") == 1
    code, _, err = run(["analyze", root / "sd.pt", "--max-memory", "1KiB"], capsys)
    assert code == 2 and "--max-memory" in err and "give at least" in err
    code, out, _ = run(["analyze", root / "sd.pt", "--max-memory", "4GiB", "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["layers"] == in_memory_rows(root / "sd.pt")


def count_analyses(monkeypatch, fail_after=None):
    calls = []
    real = streaming.analyze_layers

    def counted(layers, settings, *args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt  # the user stops the run
        calls.append([layer.name for layer in layers])
        return real(layers, settings, *args, **kwargs)

    monkeypatch.setattr(streaming, "analyze_layers", counted)
    return calls


def test_cache_resumes_and_prune_reuses_the_alphas(root, capsys, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(cli_distributed, "GROUP_BYTES", 1)  # one tensor per group: an interruption between tensors
    with monkeypatch.context() as patch:
        calls = count_analyses(patch, fail_after=2)
        with pytest.raises(KeyboardInterrupt):
            main(["analyze", str(root / "shards"), "--preset", "llm", "--cache", str(cache)])
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2
    calls = count_analyses(monkeypatch)
    code, out, err = run(["analyze", root / "shards", "--preset", "llm", "--cache", cache, "--format", "json"], capsys)
    assert code == 0 and len(calls) == 2 and "2 of 4 matrices not analysed again" in err  # resumed: 2 left
    assert json.loads(out)["layers"] == in_memory_rows(root / "shards", preset="llm")
    calls.clear()
    code, out, err = run(["prune", root / "shards", "--sparsity", 0.5, "--cache", cache, "-o", tmp_path / "p"], capsys)
    assert code == 0 and calls == [] and "4 of 4 matrices not analysed again (cached or tied), 0 analysed" in err
    code, _, _ = run(["analyze", root / "shards", "--preset", "llm", "--fit", "median", "--cache", cache], capsys)
    assert len(calls) == 4  # other settings: nothing reused


def test_cache_is_an_output_under_the_safety_rules(root, tmp_path, capsys):
    folder = tmp_path / "shards"
    shutil.copytree(root / "shards", folder)
    code, _, err = run(["analyze", folder, "--cache", folder / "cache"], capsys)
    assert code == 2 and "lies inside the input folder" in err and not (folder / "cache").exists()
    code, _, err = run(["analyze", folder / "model-0.safetensors", "--cache", folder / "model-0.safetensors"], capsys)
    assert code == 2 and "refusing to write over an input" in err
    code, _, err = run(["analyze", folder, "--cache", folder / "config.json"], capsys)
    assert code == 2
    code, _, err = run(["analyze", folder, "--cache", tmp_path / "no" / "such" / "cache"], capsys)
    assert code == 5 and "does not exist" in err


def test_progress_moves_within_a_big_tensor_as_its_windows_are_solved(root):
    from farms_lightning.engine.analysis import resolve_settings

    checkpoint = streaming.open_checkpoint(root / "sd.safetensors", trust_pickle=False)
    layers = streaming.select(checkpoint, None, ["enc.0"], None)
    heard = []
    options = streaming.StreamOptions(progress=lambda layer, done: heard.append((layer.name, done)))
    settings = resolve_settings(window=50, windows_per_dim=5, random_baseline=False)  # 25 windows of 50x50
    stats, analysed = streaming.analyze_stream(checkpoint, layers, settings, options)
    assert analysed == 1 and [s.status for s in stats.values()] == ["ok"]
    shares = [done for name, done in heard if name == "enc.0"]
    assert shares[-1] == 1.0 and len(shares) >= 3  # the windows' batches, then the statistics
    partial = shares[:-1]
    assert all(0 < d <= streaming.WINDOW_SHARE for d in partial)
    assert sorted(partial) == partial and partial[-1] == pytest.approx(streaming.WINDOW_SHARE)
