"""The examples a newcomer runs first: each script answers --help without running, logs stay out of git."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py") if not p.name.startswith("_"))


def test_helper_modules_are_marked():
    """Scripts have a ``main()`` run under ``__main__``; a module without one is a helper, named ``_*.py``."""
    for path in (ROOT / "examples").glob("*.py"):
        is_script = 'if __name__ == "__main__":' in path.read_text()
        assert is_script != path.name.startswith("_"), path.name


@pytest.mark.slow
def test_every_example_answers_help_without_running():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    running = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for p in SCRIPTS}
    assert len(running) >= 4
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, (name, err)
        assert out.startswith("usage: "), (name, out)
        assert "|" not in out and "alpha_mean per analysis" not in out, (name, out)  # no results: nothing ran


def test_gitignore_covers_the_example_logs():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("farms_logs/digits/version_0/events.out", "lightning_logs/version_0/hparams.yaml"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert done.returncode == 0, f"{path} is not ignored by .gitignore"
