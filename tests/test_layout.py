"""The package's wings import one way, downwards, with no import cycle (read from the source with ``ast``).

Order, bottom to top (peers on one level import neither each other):
``_version`` < ``files``, ``models`` < ``engine`` < ``policies`` < ``reporting`` < ``training``
< ``integrations``, ``cli`` < the package root (``__init__``, ``functional``).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "farms_lightning"
LEVELS = {
    "_version": 0,
    "files": 1,
    "models": 1,
    "engine": 2,
    "policies": 3,
    "reporting": 4,
    "training": 5,
    "integrations": 6,
    "cli": 6,
    "": 7,  # the package root: __init__ and functional
}
WINGS = [name for name in LEVELS if name not in ("", "_version")]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def wing_of(module: str) -> str:
    """``farms_lightning.engine.spectra`` -> ``engine``; the root's own modules -> ``""``."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    if parts[1] in LEVELS:
        return parts[1]
    return ""  # farms_lightning.functional


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every farms_lightning module -> the farms_lightning modules it imports, anywhere in its body."""
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module; `from module import name` the module.
                targets.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                               else node.module for alias in node.names)
        graph[name] = {t for t in targets if t.split(".")[0] == root.name and t != name}
    return graph


def layering_violations(root: Path) -> list[str]:
    graph = import_graph(root)
    problems = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = wing_of(source), wing_of(target)
            if target == root.name and source != root.name:
                problems.append(f"{source} imports the package root")
            elif here != there and LEVELS[there] >= LEVELS[here]:
                problems.append(f"{source} ({here or 'root'}) imports {target} ({there or 'root'}), "
                                f"which is not a wing below it")
    # A cycle among modules, within a wing or across wings (iterative DFS, colouring nodes).
    state: dict[str, int] = {}
    for start in sorted(graph):
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                problems.append("import cycle: " + " -> ".join(path[path.index(child):] + [child]))
            elif child in graph and child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return problems


def test_wings_import_only_wings_below_them_and_no_module_imports_in_a_cycle():
    assert layering_violations(PACKAGE) == []


def test_every_module_lives_in_a_wing():
    flat = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "_version.py", "functional.py"]
    assert sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()) == sorted(WINGS)


@pytest.mark.parametrize("wing", WINGS)
def test_a_wings_init_holds_its_docstring_only(wing):
    body = ast.parse((PACKAGE / wing / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    assert isinstance(body[0].value.value, str) and "import" in body[0].value.value  # says what it may import


@pytest.mark.parametrize(("module", "planted", "found"), [
    ("engine/windows.py", "from farms_lightning.training import callback", "imports farms_lightning.training.callback"),
    ("files/safe_io.py", "import farms_lightning.models.layers", "imports farms_lightning.models.layers"),
    ("cli/streaming.py", "from farms_lightning.integrations.transformers import FARMSTrainerCallback",
     "imports farms_lightning.integrations.transformers"),
    ("models/layers.py", "from farms_lightning import analyze", "imports the package root"),
    ("engine/report.py", "from farms_lightning.engine.analysis import analyze", "import cycle"),
])
def test_the_layering_check_finds_a_planted_upward_import_or_cycle(tmp_path, module, planted, found):
    copy = tmp_path / PACKAGE.name
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert layering_violations(copy) == []
    target = copy / module
    # Inside a function, where an import is easiest to hide.
    target.write_text(target.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    problems = layering_violations(copy)
    assert any(found in problem for problem in problems), problems


@pytest.mark.slow
def test_the_wheel_packages_every_wing(tmp_path):
    """A built wheel, installed in a fresh virtual environment, imports every wing and the console script."""
    root = PACKAGE.parent
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(root)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    shutil.rmtree(root / "build", ignore_errors=True)
    wheel = next((tmp_path / "dist").glob("farms_lightning-*.whl"))
    # The fresh environment sees this one's torch, lightning, ... but not its editable farms_lightning.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    # --ignore-installed: the editable install of this checkout (same version) must not count as installed.
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "--ignore-installed", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0 and "Successfully installed" in install.stdout, install.stdout + install.stderr
    wings = ", ".join(f"farms_lightning.{wing}" for wing in WINGS)
    code = (f"import sys, farms_lightning, farms_lightning.functional, {wings}\n"
            "import farms_lightning.cli.commands, farms_lightning.training.callback\n"
            "assert farms_lightning.__file__.startswith(sys.prefix), farms_lightning.__file__\n"
            "assert (farms_lightning.__version__ == __import__('importlib.metadata').metadata.version("
            "'farms_lightning'))\n"
            "assert (__import__('pathlib').Path(farms_lightning.__file__).parent / 'py.typed').is_file()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    script = subprocess.run([str(env_dir / "bin" / "farms-lightning"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert script.returncode == 0 and "analyze" in script.stdout, script.stdout + script.stderr
