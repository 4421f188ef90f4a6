"""Data safety of the command line: no output over an input, atomic writes, every I/O error one line.

Failures are injected (a mocked ``os.replace``, ``open`` or ``os.mkdir`` raising, a file size limit in a
subprocess), so the tests run as any user, root included (root ignores file permissions).
"""

import builtins
import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import heavy_tailed
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from farms_lightning.cli.commands import main
from farms_lightning.cli.weight_files import load_weights
from farms_lightning.files import safe_io
from farms_lightning.files.safe_io import TEMP_PREFIX, CLIError, atomic_write, check_output
from farms_lightning.files.safetensors_file import SafetensorsFile, save_safetensors

LATIN1 = os.fsdecode(b"caf\xe9")  # a file name that is not UTF-8


def small_state_dict(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"enc.weight": heavy_tailed(60, 40, seed=1) * scale, "enc.bias": torch.zeros(60),
            "head.weight": heavy_tailed(12, 60, seed=2) * scale}


@pytest.fixture
def inputs(tmp_path):
    """One input of each format in ``tmp_path``; the test may change into it."""
    sd = small_state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "m.ckpt")
    save_file(sd, tmp_path / "sd.safetensors", metadata={"format": "pt"})
    for folder, write, suffix in (("shards", save_file, ".safetensors"), ("torch_shards", torch.save, ".bin")):
        (tmp_path / folder).mkdir()
        write({"enc.weight": sd["enc.weight"], "enc.bias": sd["enc.bias"]}, tmp_path / folder / f"model-1{suffix}")
        write({"head.weight": sd["head.weight"]}, tmp_path / folder / f"model-2{suffix}")
        (tmp_path / folder / "config.json").write_text('{"hidden": 60}')
    return tmp_path


SOURCES = ["sd.pt", "m.ckpt", "sd.safetensors", "shards", "torch_shards"]
OUTPUTS = {"sd.pt": "out.pt", "m.ckpt": "out.ckpt", "sd.safetensors": "out.safetensors", "shards": "out",
           "torch_shards": "out"}


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "usage:" not in err
    assert err.count("\n") <= 1, err  # one line
    return code, out, err


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links followed) with a hash of its content."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def prune_argv(source, output):
    return ["prune", source, "--sparsity", 0.5, "--allocation", "uniform", "-o", output]


# ---------------------------------------------------------------- outputs over inputs (exit 2)

@pytest.mark.parametrize("argv,message", [
    (["analyze", "sd.pt", "-o", "sd.pt"], "is the input"),
    (["analyze", "m.ckpt", "-o", "./m.ckpt"], "is the input"),
    (["analyze", "sd.safetensors", "-o", "../{dir}/sd.safetensors"], "is the input"),
    (["analyze", "sd.pt", "-o", "link.pt"], "is the input"),  # a symlink to the input
    (["analyze", "sd.pt", "-o", "hard.pt"], "same file as the input"),  # a hard link
    (["analyze", "shards", "-o", "shards/model-1.safetensors"], "same file as the input"),
    (["analyze", "torch_shards", "-o", "shards_link/model-2.bin"], "same file as the input"),
    (prune_argv("sd.pt", "sd.pt"), "is the input"),
    (prune_argv("sd.safetensors", "hard.safetensors"), "same file as the input"),
    (prune_argv("shards", "shards"), "is the input"),
    (prune_argv("shards", "shards/pruned"), "inside the input folder"),
    (prune_argv("torch_shards", "shards_link/pruned"), "inside the input folder"),
    (prune_argv("shards", "."), "holds the input"),
])
def test_no_output_over_an_input(inputs, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(inputs)
    os.symlink("sd.pt", "link.pt")
    os.link("sd.pt", "hard.pt")
    os.link("sd.safetensors", "hard.safetensors")
    os.symlink("torch_shards", "shards_link")
    before = tree(inputs)
    code, out, err = run([a.format(dir=inputs.name) if isinstance(a, str) else a for a in argv], capsys)
    assert code == 2 and message in err and "refusing to write over an input" in err and out == ""
    assert tree(inputs) == before and not leftovers(inputs)


def test_a_report_inside_an_input_folder_is_fine(inputs, capsys):
    code, _, _ = run(["analyze", inputs / "shards", "-o", inputs / "shards" / "report.json"], capsys)
    assert code == 0 and json.loads((inputs / "shards" / "report.json").read_text())["summary"]["num_layers"] == 2


def test_temporary_files_of_a_killed_run_are_ignored(inputs, capsys):
    (inputs / "shards" / f"{TEMP_PREFIX}dead.safetensors").write_bytes(b"half a shard")
    assert run(prune_argv(inputs / "shards", inputs / "out"), capsys)[0] == 0
    assert sorted(os.listdir(inputs / "out")) == ["config.json", "model-1.safetensors", "model-2.safetensors"]


@pytest.mark.parametrize("argv,code,message", [
    (prune_argv("shards", "existing"), 2, "must be new or empty"),
    (prune_argv("sd.pt", "existing"), 2, "is a folder"),
    (["analyze", "sd.pt", "-o", "existing"], 2, "is a folder"),
    (prune_argv("shards", "a_file"), 2, "must be new or empty"),
])
def test_output_of_the_wrong_kind_is_refused_before_any_work(inputs, capsys, monkeypatch, argv, code, message):
    monkeypatch.chdir(inputs)
    (inputs / "existing").mkdir()
    (inputs / "existing" / "keep.txt").write_text("mine")
    (inputs / "a_file").write_text("mine")
    got, _, err = run(argv, capsys)
    assert got == code and message in err
    assert (inputs / "existing" / "keep.txt").read_text() == "mine" and (inputs / "a_file").read_text() == "mine"


def test_prune_into_an_empty_existing_folder(inputs, capsys):
    (inputs / "empty").mkdir()
    code, _, _ = run(prune_argv(inputs / "shards", inputs / "empty"), capsys)
    assert code == 0 and sorted(os.listdir(inputs / "empty")) == ["config.json", "model-1.safetensors",
                                                                  "model-2.safetensors"]


# ---------------------------------------------------------------- failed writes (exit 5, nothing lost)

def _fail_replace(monkeypatch):
    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    monkeypatch.setattr(safe_io.os, "replace", replace)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_a_failed_write_keeps_the_previous_output(inputs, capsys, monkeypatch, command, source):
    output = inputs / ("report.json" if command == "analyze" else OUTPUTS[source])
    if output.suffix:
        output.write_text("previous")
    before = tree(inputs)
    _fail_replace(monkeypatch)
    argv = ["analyze", inputs / source, "-o", output] if command == "analyze" else prune_argv(inputs / source, output)
    code, out, err = run(argv, capsys)
    assert code == 5 and f"cannot write {output}" in err and "No space left on device" in err and out == ""
    assert tree(inputs) == before and not leftovers(inputs)  # the old file intact; no half-made folder


@pytest.mark.parametrize("source", ["sd.pt", "sd.safetensors", "shards", "torch_shards"])
def test_writer_errors_are_output_errors(inputs, capsys, monkeypatch, source):
    """The torch zip writer's RuntimeError and safetensors' SafetensorError on a full disk: exit 5."""
    def torch_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    calls = []

    def safetensors_save(tensors, path, metadata=None, load=None, **options):
        calls.append(path)
        if len(calls) == 2:  # the second shard of a folder: the first is already written
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_safetensors(tensors, path, metadata, load, **options)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr("farms_lightning.cli.stream_prune.save_safetensors", safetensors_save)
    if source == "sd.safetensors":
        calls.append("first")
    before = tree(inputs)
    code, _, err = run(prune_argv(inputs / source, inputs / OUTPUTS[source]), capsys)
    assert code == 5 and "cannot write" in err
    assert ("No space left on device" in err) if "safetensors" in source or source == "shards" else \
        ("the torch writer failed" in err)
    assert tree(inputs) == before and not leftovers(inputs)


@pytest.mark.slow
def test_full_disk_in_a_subprocess(inputs):
    """A real write failure: a file size limit (RLIMIT_FSIZE, as ``ulimit -f``) below every output's size."""
    outputs = {"analyze": "report.json", "sd.pt": "out.pt", "m.ckpt": "out.ckpt",
               "sd.safetensors": "out.safetensors", "shards": "out", "torch_shards": "out_torch"}
    for name in ("report.json", "out.pt", "out.ckpt", "out.safetensors"):
        (inputs / name).write_text("previous")
    script = textwrap.dedent(f"""
        import json, resource, sys
        from farms_lightning.cli.commands import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (600, resource.RLIM_INFINITY))
        runs = {{"analyze": ["analyze", "sd.pt", "--format", "json", "-o", "report.json"]}}
        for source, out in {outputs!r}.items():
            if source != "analyze":
                runs[source] = ["prune", source, "--sparsity", "0.5", "--allocation", "uniform", "-o", out]
        print(json.dumps({{k: main(argv) for k, argv in runs.items()}}))
    """)
    before = tree(inputs)
    package = str(Path(safe_io.__file__).parents[1])  # this checkout, whatever is installed
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([package, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=inputs, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {k: 5 for k in outputs}
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(outputs) and all("error: cannot write" in line and "File too large" in line
                                              for line in lines), done.stderr
    assert tree(inputs) == before and not leftovers(inputs)
    assert not (inputs / "out").exists() and not (inputs / "out_torch").exists()


# ---------------------------------------------------------------- unreadable inputs, unwritable outputs

def _deny(monkeypatch, module, name, when):
    real = getattr(module, name)

    def denied(path, *args, **kwargs):
        if when(os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(module, name, denied)


@pytest.mark.parametrize("source,denied", [(s, d) for s in SOURCES for d in ("open", "stat", "listdir")
                                           if d != "listdir" or "shards" in s])
@pytest.mark.parametrize("command", ["analyze", "prune"])
def test_unreadable_inputs_exit_3(inputs, capsys, monkeypatch, command, source, denied):
    victim = str(inputs / source) if denied != "open" or "shards" not in source else str(inputs / source / "model-2")
    for module in (builtins, os) if denied == "open" else (os,):  # the safetensors reader opens with os.open
        _deny(monkeypatch, module, denied, lambda path: path.startswith(victim))
    argv = ["analyze", inputs / source] if command == "analyze" else prune_argv(inputs / source, inputs / "out.x")
    code, out, err = run(argv, capsys)
    assert code == 3 and "cannot read" in err and "Permission denied" in err and out == ""


@pytest.mark.parametrize("source", SOURCES)
def test_unwritable_output_folder_exits_5(inputs, capsys, monkeypatch, source):
    _deny(monkeypatch, os, "open", lambda path: TEMP_PREFIX in path)
    _deny(monkeypatch, os, "mkdir", lambda path: TEMP_PREFIX in path)
    for argv in (["analyze", inputs / source, "-o", inputs / "r.json"], prune_argv(inputs / source, inputs / "o.x")):
        code, _, err = run(argv, capsys)
        assert code == 5 and "cannot write" in err and "Permission denied" in err
    assert not leftovers(inputs)


def test_names_too_long(inputs, capsys):
    code, _, err = run(["analyze", inputs / ("x" * 300 + ".pt")], capsys)
    assert code == 3 and "File name too long" in err
    longest = inputs / ("y" * 250 + ".json")  # a valid name: the temporary name must stay short too
    code, _, _ = run(["analyze", inputs / "sd.pt", "-o", longest], capsys)
    assert code == 0 and json.loads(longest.read_text())["summary"]["num_layers"] == 2
    code, _, _ = run(prune_argv(inputs / "sd.pt", inputs / ("z" * 252 + ".pt")), capsys)
    assert code == 0 and (inputs / ("z" * 252 + ".pt")).is_file()
    code, _, err = run(["analyze", inputs / "sd.pt", "-o", inputs / ("y" * 300 + ".json")], capsys)
    assert code == 5 and "File name too long" in err


def test_output_permissions_follow_the_umask(inputs, capsys):
    old = os.umask(0o027)
    try:
        for argv in (["analyze", inputs / "sd.pt", "-o", inputs / "r.json"], prune_argv(inputs / "sd.pt", inputs / "p.pt"),
                     prune_argv(inputs / "shards", inputs / "out")):
            assert run(argv, capsys)[0] == 0
    finally:
        os.umask(old)
    modes = {name: (inputs / name).stat().st_mode & 0o777 for name in ("r.json", "p.pt", "out", "out/model-1.safetensors",
                                                                         "out/config.json")}
    assert modes == {"r.json": 0o640, "p.pt": 0o640, "out": 0o750, "out/model-1.safetensors": 0o640,
                     "out/config.json": (inputs / "shards" / "config.json").stat().st_mode & 0o777}
    os.chmod(inputs / "r.json", 0o600)  # a file that exists keeps its permissions, as with a plain write
    assert run(["analyze", inputs / "sd.pt", "-o", inputs / "r.json"], capsys)[0] == 0
    assert (inputs / "r.json").stat().st_mode & 0o777 == 0o600


def test_atomic_write_never_follows_a_symlink(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    os.symlink("real.txt", tmp_path / "link.txt")
    os.symlink("created.txt", tmp_path / "dangling.txt")
    for link in ("link.txt", "dangling.txt"):
        with pytest.raises(safe_io.UnsafeTarget, match="is a symbolic link") as refused:
            atomic_write(tmp_path / link, lambda tmp: tmp.write_text("new"))
        assert refused.value.code == 2 and (tmp_path / link).is_symlink()
    assert (tmp_path / "real.txt").read_text() == "old" and not (tmp_path / "created.txt").exists()
    with pytest.raises(ZeroDivisionError):  # not an I/O error: raised as it is, and nothing is left over
        atomic_write(tmp_path / "real.txt", lambda tmp: tmp.write_text("half") and 1 / 0)
    assert (tmp_path / "real.txt").read_text() == "old" and not leftovers(tmp_path)


# ---------------------------------------------------------------- non-UTF-8 names

@pytest.mark.parametrize("source", ["sd.pt", "sd.safetensors", "shards"])
def test_names_that_are_not_utf8(inputs, capsys, source):
    named = inputs / (LATIN1 + Path(source).suffix)
    os.rename(inputs / source, named)
    if source == "shards":
        os.rename(named / "model-2.safetensors", named / (LATIN1 + ".safetensors"))
    code, out, err = run(["analyze", named, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["file"].endswith("caf\\xe9" + Path(source).suffix)
    output = inputs / (LATIN1 + "-pruned" + Path(source).suffix)
    code, out, _ = run(prune_argv(named, output), capsys)
    assert code == 0 and "caf\\xe9" in out
    pruned = load_weights(output).state_dict
    assert int((pruned["head.weight"] == 0).sum()) == 360 and torch.equal(pruned["enc.bias"], torch.zeros(60))


# ---------------------------------------------------------------- shards

def test_a_key_in_two_shards_is_an_input_error(inputs, capsys):
    save_file({"head.weight": torch.ones(12, 60)}, inputs / "shards" / "model-3.safetensors")
    before = tree(inputs)
    for argv in (["analyze", inputs / "shards"], prune_argv(inputs / "shards", inputs / "out")):
        code, _, err = run(argv, capsys)
        assert code == 3 and "'head.weight' is in two shards, model-2.safetensors and model-3.safetensors" in err
    assert tree(inputs) == before and not (inputs / "out").exists()


def _index(folder: Path, mapping: dict, name: str = "model.safetensors.index.json") -> None:
    (folder / name).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": mapping}))


def test_an_index_says_which_shard_holds_which_key(inputs, capsys):
    shards = inputs / "shards"
    mapping = {"enc.weight": "model-1.safetensors", "enc.bias": "model-1.safetensors",
               "head.weight": "model-2.safetensors"}
    _index(shards, mapping)
    code, _, _ = run(prune_argv(shards, inputs / "out"), capsys)
    assert code == 0 and json.loads((inputs / "out" / "model.safetensors.index.json").read_text())["weight_map"] == \
        mapping
    assert int((load_file(inputs / "out" / "model-2.safetensors")["head.weight"] == 0).sum()) == 360
    cases = [
        ({**mapping, "enc.bias": "model-2.safetensors"}, "holds 'enc.bias' but model.safetensors.index.json maps it "
                                                         "to model-2.safetensors"),
        ({k: v for k, v in mapping.items() if k != "enc.bias"}, "holds 'enc.bias' but model.safetensors.index.json "
                                                                "does not list it"),
        ({**mapping, "extra.weight": "model-2.safetensors"}, "maps 'extra.weight' to model-2.safetensors, which does"),
        ({**mapping, "extra.weight": "model-9.safetensors"}, "names the shard model-9.safetensors"),
    ]
    for bad, message in cases:
        _index(shards, bad)
        code, _, err = run(["analyze", shards], capsys)
        assert code == 3 and message in err, err
    _index(shards, {k: v for k, v in mapping.items() if k != "head.weight"})
    code, _, err = run(["analyze", shards], capsys)  # a shard the index does not name, holding tensors
    assert code == 3 and "model-2.safetensors holds tensors but" in err


def test_torch_shards_with_an_index_and_a_training_arguments_file(inputs, capsys):
    folder = inputs / "torch_shards"
    _index(folder, {"enc.weight": "model-1.bin", "enc.bias": "model-1.bin", "head.weight": "model-2.bin"},
           "pytorch_model.bin.index.json")
    torch.save({"lr": 0.1, "args": types.SimpleNamespace(lr=0.1)}, folder / "training_args.bin")  # not weights
    code, _, err = run(prune_argv(folder, inputs / "out"), capsys)
    assert code == 0, err
    assert (inputs / "out" / "training_args.bin").read_bytes() == (folder / "training_args.bin").read_bytes()


# ---------------------------------------------------------------- argument errors: one line, a hint

@pytest.mark.parametrize("argv,prog,message", [
    (["analyze", "sd.pt", "--fitt", "peak"], "farms-lightning analyze", "unrecognized arguments: --fitt peak "
                                                                        "(did you mean --fit?)"),
    (["prune", "sd.pt", "--sparsity", "0.5", "-o", "x.pt", "--epsilom", "0.1"], "farms-lightning prune",
     "did you mean --epsilon?"),
    (["analyze", "--include", "enc.*", "sd.pt"], "farms-lightning analyze",
     "PATH is missing: 'sd.pt' was read as a value of --include, which takes several; put PATH first"),
    (["analyze", "--exclude", "head", "sd.pt", "-o", "r.json"], "farms-lightning analyze",
     "'sd.pt' was read as a value of --exclude"),
    (["analyze", "sd.pt", "--layer-types", ","], "farms-lightning analyze", "--layer-types names no type"),
    (["analyze", "sd.pt", "--fit", "best"], "farms-lightning analyze", "invalid choice: 'best'"),
    (["prune", "sd.pt"], "farms-lightning prune", "required: --sparsity"),
    (["analyze"], "farms-lightning analyze", "required: PATH"),
    ([], "farms-lightning", "required: {analyze,prune,plot}"),
    (["analyse", "sd.pt"], "farms-lightning", "invalid choice: 'analyse'"),
])
def test_argument_errors_are_one_line_with_a_hint(inputs, capsys, monkeypatch, argv, prog, message):
    monkeypatch.chdir(inputs)
    code, out, err = run(argv, capsys)
    assert code == 2 and out == "" and err.startswith(f"{prog}: error: ") and message in err
    assert err.rstrip().endswith(f"(see {prog} --help)")


@pytest.mark.parametrize("argv", [["--help"], ["analyze", "--help"], ["prune", "--help"]])
def test_help_has_no_markup(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: farms-lightning" in out and "``" not in out and ":mod:" not in out and ":func:" not in out


# ---------------------------------------------------------------- the safetensors reader and writer

def test_safetensors_reader_and_writer_match_the_package(tmp_path):
    tensors = {"f64": torch.randn(3, 4, dtype=torch.float64), "bf16": torch.randn(5).bfloat16(),
               "f16": torch.randn(2, 2).half(), "i64": torch.arange(6).reshape(2, 3), "b": torch.tensor([True, False]),
               "u8": torch.arange(7, dtype=torch.uint8), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5),
               "t": torch.randn(4, 3).t()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata={"a": "b"})
    with SafetensorsFile(tmp_path / "theirs.safetensors") as f:
        assert f.keys() == sorted(tensors) and f.metadata() == {"a": "b"}
        assert all(torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype for k, v in tensors.items())
    save_safetensors(tensors, tmp_path / "ours.safetensors", {"a": "b"})
    loaded = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"a": "b"}


@pytest.mark.parametrize("damage", ["truncate", "header", "offsets", "short"])
def test_damaged_safetensors_exit_3(tmp_path, capsys, damage):
    save_file(small_state_dict(), tmp_path / "ok.safetensors")
    data = bytearray((tmp_path / "ok.safetensors").read_bytes())
    length = int.from_bytes(data[:8], "little")
    if damage == "truncate":
        data = data[:-10]
    elif damage == "header":
        data[9] = ord("!")
    elif damage == "offsets":
        data[8:8 + length] = data[8:8 + length].replace(b'"data_offsets":[0,', b'"data_offsets":[4,')
    else:
        data = data[:5]
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    code, _, err = run(["analyze", tmp_path / "bad.safetensors"], capsys)
    assert code == 3 and "as safetensors (truncated or corrupt?)" in err


def test_check_output_needs_an_existing_folder(tmp_path):
    with pytest.raises(CLIError) as missing:
        check_output(tmp_path / "no" / "out.json", [tmp_path / "in.pt"])
    assert missing.value.code == 5 and "does not exist" in str(missing.value)


def test_a_closed_standard_output_is_an_output_error(inputs, capsys, monkeypatch):
    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            raise ValueError("no file descriptor")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["analyze", str(inputs / "sd.pt")])
    assert code == 5 and capsys.readouterr().err == \
        "farms-lightning analyze: error: cannot write the standard output: Broken pipe\n"
