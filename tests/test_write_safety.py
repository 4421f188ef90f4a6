"""The write side under attack: links, special files, a model folder's odd entries, signals, stale temporaries.

Each test builds the hostile case (a link to another file, a ``mknod`` copy of ``/dev/null``, a FIFO, a
folder link out of the model, SIGTERM mid-run) and checks that nothing outside the command's own
output changed, that the exit code is the documented one and that no temporary file is left.
"""

import hashlib
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import heavy_tailed
from safetensors.torch import save_file

from farms_lightning.cli import cli_distributed, stream_prune
from farms_lightning.cli.cli_distributed import Interrupted, RankLost, stop_on_signals, together
from farms_lightning.cli.commands import main
from farms_lightning.files import strict_json
from farms_lightning.files.safe_io import TEMP_PREFIX, UnsafeTarget, atomic_write, write_text
from farms_lightning.files.temp_files import STALE_AFTER_S, create_temp, host_tag, remove_stale_temps
from farms_lightning.reporting.history import load_history, write_history

ROOT = os.geteuid() == 0
PACKAGE = str(Path(__file__).resolve().parents[1])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([PACKAGE, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def model(tmp_path):
    """A small safetensors file and a folder of two shards with a config."""
    weights = {"enc.weight": heavy_tailed(60, 40, seed=1), "head.weight": heavy_tailed(24, 60, seed=2)}
    save_file(weights, tmp_path / "m.safetensors")
    (tmp_path / "shards").mkdir()
    save_file({"enc.weight": weights["enc.weight"]}, tmp_path / "shards" / "model-1.safetensors")
    save_file({"head.weight": weights["head.weight"]}, tmp_path / "shards" / "model-2.safetensors")
    (tmp_path / "shards" / "config.json").write_text('{"hidden": 60}')
    return tmp_path


# ---------------------------------------------------------------- item 1 and 2: links and special files

@pytest.fixture
def hostile_targets(model):
    """Output names that must never be written through: links (to a file, dangling), a FIFO, a
    ``mknod`` copy of ``/dev/null`` (as root), a socket."""
    (model / "victim.txt").write_text("keep me")
    os.symlink("victim.txt", model / "link.json")
    os.symlink("created-by-the-link.json", model / "dangling.json")
    os.mkfifo(model / "fifo.json")
    targets = ["link.json", "dangling.json", "fifo.json"]
    if ROOT:
        os.mknod(model / "null.json", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        targets.append("null.json")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(model / "socket.json"))
    targets.append("socket.json")
    yield model, targets
    server.close()


def test_outputs_that_are_links_or_special_files_are_refused(hostile_targets, capsys):
    model, targets = hostile_targets
    kinds = {name: stat.S_IFMT(os.lstat(model / name).st_mode) for name in targets}
    for name in targets:
        for argv in (["analyze", model / "m.safetensors", "-o", model / name],
                     ["prune", model / "m.safetensors", "--sparsity", 0.5, "--allocation", "uniform", "-o",
                      model / name]):
            code, out, err = cli(argv, capsys)
            assert code == 2, (name, err)
            assert ("symbolic link" in err) if name in ("link.json", "dangling.json") else ("not a regular file" in err)
            assert out == "" and err.count("\n") == 1
    assert {name: stat.S_IFMT(os.lstat(model / name).st_mode) for name in targets} == kinds
    assert (model / "victim.txt").read_text() == "keep me" and not (model / "created-by-the-link.json").exists()
    assert not leftovers(model)


def test_atomic_write_refuses_what_check_output_did_not_see(hostile_targets):
    """A cache entry or a history file goes straight to atomic_write: the same refusal, as an
    exception the caller can catch (UnsafeTarget, exit code 2)."""
    model, targets = hostile_targets
    for name in targets:
        with pytest.raises(UnsafeTarget) as refused:
            write_text(model / name, "{}")
        assert refused.value.code == 2
    assert (model / "victim.txt").read_text() == "keep me" and not (model / "created-by-the-link.json").exists()
    assert not leftovers(model)


def test_a_cache_entry_linked_to_the_input_never_overwrites_it(model, capsys):
    cache = model / "cache"
    assert cli(["analyze", model / "m.safetensors", "--cache", cache], capsys)[0] == 0
    before = digest(model / "m.safetensors")
    entries = sorted(cache.glob("*.json"))
    assert entries
    for entry in entries:
        entry.unlink()
        os.symlink(model / "m.safetensors", entry)
    # A miss with a warning: the link is removed (never followed) and a fresh entry written in its place.
    code, _, err = cli(["analyze", model / "m.safetensors", "--cache", cache], capsys)
    assert code == 0 and "link" in err
    assert digest(model / "m.safetensors") == before
    assert all(entry.is_file() and not entry.is_symlink() for entry in entries)
    assert not leftovers(model)


def test_temporary_files_are_private_and_exclusive(tmp_path):
    tmp = create_temp(tmp_path, ".json")
    folder = tmp.parent
    assert folder.name.startswith(f"{TEMP_PREFIX}{host_tag()}-{os.getpid()}-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and tmp.is_file() and not tmp.is_symlink()
    atomic_write(tmp_path / "out.json", lambda path: path.write_text("{}"))
    assert (tmp_path / "out.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == sorted(["out.json", folder.name])


# ---------------------------------------------------------------- item 3: a model folder's other files

@pytest.fixture
def hostile_folder(model):
    """A Hugging Face-like snapshot: a file linked to a blob, plus a folder link out of the model, a
    FIFO named like a tokenizer file, a dangling link and a folder link inside a sub-folder."""
    (model / "blobs").mkdir()
    (model / "blobs" / "abc123").write_text('{"tokenizer": true}')
    (model / "outside").mkdir()
    (model / "outside" / "secret.txt").write_text("not the model's")
    folder = model / "shards"
    os.symlink("../blobs/abc123", folder / "tokenizer.json")
    os.symlink(model / "outside", folder / "tz")
    os.mkfifo(folder / "vocab.txt")
    os.symlink("missing.txt", folder / "dangling.txt")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"mean": true}')
    os.symlink("/", folder / "1_Pooling" / "root")
    return model


def test_prune_copies_file_links_by_content_and_skips_the_rest(hostile_folder):
    """In a subprocess with a timeout: a FIFO opened to read would block for ever."""
    model = hostile_folder
    done = subprocess.run([sys.executable, "-m", "farms_lightning.cli", "prune", "shards", "--sparsity", "0.5",
                           "--allocation", "uniform", "--device", "cpu", "-o", "pruned"], cwd=model,
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    out = model / "pruned"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "1_Pooling", "1_Pooling/config.json", "config.json", "model-1.safetensors", "model-2.safetensors",
        "tokenizer.json"]
    assert not (out / "tokenizer.json").is_symlink() and (out / "tokenizer.json").read_text() == '{"tokenizer": true}'
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 4 and all("not copied" in line for line in warnings)
    for name in ("tz", "vocab.txt", "dangling.txt", "1_Pooling/root"):
        assert any(f"pruned/{name} not copied" in line for line in warnings), (name, warnings)
    assert stat.S_ISFIFO(os.lstat(model / "shards" / "vocab.txt").st_mode) and not leftovers(model)


# ---------------------------------------------------------------- item 4: signals and stale temporaries

@pytest.fixture
def big_folder(tmp_path):
    """Six 16 MiB shards: pruning them takes seconds, long enough to be stopped mid-write."""
    folder = tmp_path / "big"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(6):
        save_file({f"layer{i}.weight": torch.randn(2048, 2048, generator=generator)},
                  folder / f"model-{i}.safetensors")
    return folder


def _stop_when(process: subprocess.Popen, ready, signum: int) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the command ended before it could be stopped"
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def _written_shards(parent: Path) -> int:
    """Shards already renamed into place inside the command's temporary output folder."""
    try:
        return sum(len(list(folder.glob("model-*.safetensors"))) for folder in leftovers(parent))
    except OSError:  # a folder removed while it is listed
        return 0


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_prune_removes_every_temporary(big_folder, signum, code):
    parent = big_folder.parent
    process = subprocess.Popen([sys.executable, "-m", "farms_lightning.cli", "prune", big_folder, "--sparsity", "0.5",
                                "--allocation", "uniform", "--device", "cpu", "--no-progress", "-o", parent / "out"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    # Stopped once the temporary folder holds a written shard: mid-way through the second pass.
    returncode, err = _stop_when(process, lambda: _written_shards(parent) >= 2, signum)
    assert returncode == code, err
    assert err.strip().count("\n") == 0 and f"stopped by {signal.Signals(signum).name}" in err
    assert not leftovers(parent) and not (parent / "out").exists()


def test_sigterm_during_analyze_with_a_cache(big_folder):
    parent = big_folder.parent
    cache = parent / "cache"
    process = subprocess.Popen([sys.executable, "-m", "farms_lightning.cli", "analyze", big_folder, "--preset", "llm",
                                "--device", "cpu", "--no-progress", "--cache", cache, "-o", parent / "r.json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    returncode, err = _stop_when(process, lambda: cache.is_dir() and any(cache.glob("*.json")), signal.SIGTERM)
    assert returncode == 143 and "stopped by SIGTERM" in err and "Traceback" not in err
    assert not leftovers(parent) and not (parent / "r.json").exists()


def test_stop_on_signals_raises_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is before


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    here, dead = host_tag(), _dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [f"{TEMP_PREFIX}{here}-{dead}-0123abcd", f"{TEMP_PREFIX}{here}-{dead}-4567abcd.safetensors"]
        old_elsewhere = f"{TEMP_PREFIX}000000-{alive.pid}-89abcdef.json"
        kept = [f"{TEMP_PREFIX}{here}-{alive.pid}-0123abcd", f"{TEMP_PREFIX}000000-{dead}-0123abcd",
                f"{TEMP_PREFIX}not-ours", "model.safetensors"]
        (tmp_path / stale[0]).mkdir()
        (tmp_path / stale[0] / "half.safetensors").write_bytes(b"half")
        for name in [stale[1], old_elsewhere, *kept]:
            (tmp_path / name).write_bytes(b"x")
        day_ago = time.time() - STALE_AFTER_S - 60
        os.utime(tmp_path / old_elsewhere, (day_ago, day_ago))
        removed = remove_stale_temps(tmp_path)
        assert sorted(p.name for p in removed) == sorted([*stale, old_elsewhere])
        assert sorted(os.listdir(tmp_path)) == sorted(kept)
    finally:
        alive.kill()
        alive.wait()


def test_an_output_cleans_up_after_a_killed_run(model, capsys):
    leftover = model / f"{TEMP_PREFIX}{host_tag()}-{_dead_pid()}-0123abcd"
    leftover.mkdir()
    (leftover / "model-1.safetensors").write_bytes(b"partial")
    assert cli(["analyze", model / "m.safetensors", "-o", model / "r.json"], capsys)[0] == 0
    assert not leftover.exists() and (model / "r.json").is_file()


def test_a_lost_rank_is_one_line(monkeypatch):
    def all_reduce(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer\nmore")

    monkeypatch.setattr(cli_distributed, "distributed_context", lambda: (1, 2))
    monkeypatch.setattr(cli_distributed, "_collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_distributed.dist, "all_reduce", all_reduce)
    with pytest.raises(RankLost) as lost:
        together(lambda: 1)
    assert lost.value.code == 1 and "lost contact with another rank" in str(lost.value)
    assert "\n" not in str(lost.value)


# ---------------------------------------------------------------- item 6: history files

def test_history_files_are_strict_json_atomic_and_never_through_a_link(tmp_path, monkeypatch):
    history = [{"stage": "epoch", "epoch": 0, "step": 5, "time_s": 0.1, "summary": {"alpha_mean": math.nan},
                "layers": [{"name": "enc", "status": "ok", "alpha": math.nan, "D": 0.1}]}]
    path = tmp_path / "logs" / "farms_history.json"
    write_history(history, path)
    data = strict_json.loads(path.read_text(), "history")  # no NaN accepted: the file is standard JSON
    assert data[0]["summary"]["alpha_mean"] is None and data[0]["layers"][0]["alpha"] is None
    assert load_history(path)[0]["layers"][0]["alpha"] is None
    old = tmp_path / "old_history.json"  # written by an earlier version: bare NaN, still read
    old.write_text(json.dumps(history))
    assert "NaN" in old.read_text() and math.isnan(load_history(old)[0]["layers"][0]["alpha"])

    def replace(src, dst):
        raise OSError(28, "No space left on device")
    before = path.read_text()
    monkeypatch.setattr("farms_lightning.files.safe_io.os.replace", replace)
    with pytest.raises(Exception, match="No space left"):
        write_history(history * 2, path)
    monkeypatch.undo()
    assert path.read_text() == before and not leftovers(tmp_path)

    (tmp_path / "victim.csv").write_text("keep")
    os.symlink("victim.csv", tmp_path / "logs" / "farms_history.csv")
    with pytest.raises(UnsafeTarget):
        write_history(history, tmp_path / "logs" / "farms_history.csv")
    assert (tmp_path / "victim.csv").read_text() == "keep"
    write_history(history, tmp_path / "logs" / "other.csv")
    assert load_history(tmp_path / "logs" / "other.csv")[0]["layers"][0]["name"] == "enc"


# ---------------------------------------------------------------- item 11's write part

def test_a_tensor_name_with_a_lone_surrogate_is_written_escaped(tmp_path, capsys):
    torch.save({"enc\udce9.weight": heavy_tailed(60, 40, seed=1)}, tmp_path / "odd.pt")
    for name in ("r.md", "r.csv", "r.json", "r.txt"):
        code, _, err = cli(["analyze", tmp_path / "odd.pt", "-o", tmp_path / name], capsys)
        assert code == 0, err
        assert "enc\\udce9" in (tmp_path / name).read_text(encoding="utf-8")
    code, out, _ = cli(["analyze", tmp_path / "odd.pt", "--format", "csv"], capsys)
    assert code == 0 and "\nenc\\udce9," in out  # the layer's name: the key less ".weight"


@pytest.mark.parametrize("source", ["m.safetensors", "shards", "sd.pt"])
@pytest.mark.parametrize("change", ["truncate", "swap"])
def test_an_input_changed_between_the_passes_of_prune_is_exit_3(model, capsys, monkeypatch, source, change):
    torch.save({"enc.weight": heavy_tailed(60, 40, seed=1)}, model / "sd.pt")
    victim = model / source if source != "shards" else model / "shards" / "model-1.safetensors"
    real = stream_prune.prune_stream

    def changed_first(*args, **kwargs):  # the first pass is over; the file changes before the second
        if change == "truncate":
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        elif victim.suffix == ".pt":
            torch.save({"enc.weight": torch.ones(3, 3)}, victim)
        else:
            save_file({"enc.weight": torch.ones(3, 3)}, victim)
        return real(*args, **kwargs)

    monkeypatch.setattr("farms_lightning.cli.commands.prune_stream", changed_first)
    code, out, err = cli(["prune", model / source, "--sparsity", 0.5, "--allocation", "uniform", "-o",
                          model / ("out" + Path(source).suffix)], capsys)
    assert code == 3 and err.count("\n") == 1 and out == "", err
    assert not leftovers(model) and not (model / ("out" + Path(source).suffix)).exists()
