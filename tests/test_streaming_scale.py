"""Streaming at scale: a generated sharded checkpoint analysed and pruned in memory well below its size,
with the in-memory path's results; torchrun with two ranks gives one process's outputs."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from farms_lightning import analyze
from farms_lightning.cli.commands import _jsonable
from farms_lightning.cli.weight_files import load_weights, save_weights
from farms_lightning.models.state_dict import model_from_state_dict
from farms_lightning.policies.pruners import prune_model
from farms_lightning.policies.pruning import alpha_sparsity

SHARDS, PER_SHARD, SHAPE = 4, 8, (1024, 2048)  # 32 float32 matrices of 8 MiB: a 256 MiB checkpoint
MiB = 1 << 20


def generate(folder: Path, kind: str, shards: int = SHARDS, per_shard: int = PER_SHARD, shape=SHAPE) -> int:
    """A sharded checkpoint of Student-t matrices (plus biases); returns its size in bytes."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):
        part = {}
        for j in range(per_shard):
            gauss = torch.randn(shape, generator=gen)
            chi = torch.randn((*shape, 3), generator=gen).pow(2).mean(-1)  # Student-t with 3 degrees of freedom
            part[f"layers.{s * per_shard + j}.proj.weight"] = gauss / chi.sqrt() / shape[1] ** 0.5
            part[f"layers.{s * per_shard + j}.proj.bias"] = torch.zeros(shape[0])
        if kind == "safetensors":
            save_file(part, folder / f"model-{s:05d}.safetensors")
        else:
            torch.save(part, folder / f"model-{s:05d}.bin")
    return sum(p.stat().st_size for p in folder.iterdir())


def measured(argv: list[str]) -> tuple[int, int, str]:
    """Run the CLI in a child process: (peak RSS, peak anonymous RSS) in bytes, and its stdout.

    The peak RSS is the kernel's high-water mark (``ru_maxrss``); ``RssAnon`` (memory that is not
    a mapped file) has no such mark and is sampled every 2 ms.
    """
    # One thread: the solver's batches (one per thread) are then the same in every run.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "farms_lightning.cli", *map(str, argv)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    anon = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.002)
    child.returncode = os.waitstatus_to_exitcode(status)
    out = child.stdout.read().decode()
    assert child.returncode == 0, out
    return usage.ru_maxrss * 1024, anon, out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_sharded_checkpoint_streams_in_bounded_memory(tmp_path, kind):
    """Memory does not grow with the model: four shards cost what one shard costs.

    ``prune`` streams twice (the analysis for the alphas, then the pruned copy). Its baseline is one
    shard of the same tensors (the same groups and solver batches; for torch, one shard mapped and
    pruned), so the difference is what three more shards (192 MiB) add; read whole, they would add
    at least 192 MiB.
    """
    from farms_lightning.cli.commands import main

    size = generate(tmp_path / "big", kind)
    added = size - generate(tmp_path / "small", kind, shards=1)
    prune = ["--sparsity", 0.5, "--preset", "cv", "--format", "json"]
    small = measured(["prune", tmp_path / "small", *prune, "-o", tmp_path / "small_pruned"])
    rss, anon, _ = measured(["prune", tmp_path / "big", *prune, "-o", tmp_path / "pruned"])
    print(f"\n{kind}, {size / MiB:.0f} MiB in {SHARDS} shards: prune peak RSS {rss / MiB:.0f} MiB, RssAnon "
          f"{anon / MiB:.0f} MiB; one shard: {small[0] / MiB:.0f}, {small[1] / MiB:.0f} MiB")
    assert anon - small[1] < added / 4 and rss - small[0] < added / 2

    weights = load_weights(tmp_path / "big")  # the in-memory path (this process holds the whole model)
    model = model_from_state_dict(weights.state_dict)
    report = analyze(model)
    assert main(["analyze", str(tmp_path / "big"), "--format", "json", "-o", str(tmp_path / "report.json")]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["layers"]
    assert rows == json.loads(json.dumps(_jsonable(report.to_rows()))) and len(rows) == SHARDS * PER_SHARD
    prune_model(model, alpha_sparsity(analyze(model, preset="cv"), 0.5))
    save_weights(weights, tmp_path / "expected")
    for file in sorted((tmp_path / "expected").iterdir()):
        if file.suffix == ".bin":
            a, b = torch.load(file), torch.load(tmp_path / "pruned" / file.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert file.read_bytes() == (tmp_path / "pruned" / file.name).read_bytes()


def torchrun(argv: list, tmp_path: Path, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    target = ["-m", "farms_lightning.cli"] if script is None else [script]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               *target, *map(str, argv)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_torchrun_two_ranks_give_one_process_outputs(tmp_path, capsys):
    from farms_lightning.cli.commands import main

    for kind in ("safetensors", "torch"):
        generate(tmp_path / kind, kind, shards=3, per_shard=2, shape=(200, 300))
    assert main(["analyze", str(tmp_path / "safetensors"), "--format", "json", "-o", str(tmp_path / "one.json")]) == 0
    done = torchrun(["analyze", tmp_path / "safetensors", "--format", "json", "-o", tmp_path / "two.json"], tmp_path)
    assert done.returncode == 0, done.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["settings"].pop("world_size"), two["settings"].pop("world_size")) == (1, 2)
    assert one == two  # everything else identical, device included (both on the CPU)
    for kind in ("safetensors", "torch"):
        assert main(["prune", str(tmp_path / kind), "--sparsity", "0.5", "--preset", "cv", "-o",
                     str(tmp_path / f"{kind}_one")]) == 0
        done = torchrun(["prune", tmp_path / kind, "--sparsity", 0.5, "--preset", "cv", "-o", tmp_path / f"{kind}_two"],
                        tmp_path)
        assert done.returncode == 0, done.stderr
        names = sorted(p.name for p in (tmp_path / f"{kind}_one").iterdir())
        assert names == sorted(p.name for p in (tmp_path / f"{kind}_two").iterdir()) and len(names) == 4
        for name in names:
            assert (tmp_path / f"{kind}_one" / name).read_bytes() == (tmp_path / f"{kind}_two" / name).read_bytes()
    capsys.readouterr()

    # A write that fails on rank 1 only: every rank exits with its code, nothing is left behind.
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from farms_lightning.cli import stream_prune
        from farms_lightning.cli.commands import main
        from farms_lightning.files.safe_io import output_errors
        real = stream_prune._write_file
        def write(checkpoint, shard, sparsities, target, label=None):
            if os.environ["RANK"] == "1":
                with output_errors(label):
                    raise OSError(28, "No space left on device")
            return real(checkpoint, shard, sparsities, target, label)
        stream_prune._write_file = write
        sys.exit(main())
    """))
    before = sorted(p.name for p in tmp_path.iterdir())
    done = torchrun(["prune", tmp_path / "safetensors", "--sparsity", 0.5, "--preset", "cv", "-o", tmp_path / "failed"],
                    tmp_path, script=str(script))
    assert done.returncode != 0 and "[rank 1] farms-lightning prune: error" in done.stderr
    assert "No space left on device" in done.stderr and "another rank failed (exit code 5)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder
