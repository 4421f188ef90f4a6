"""Every code block in README.md and docs/*.md runs as written.

The collector reads the fenced blocks with a small regex, no Markdown library:

- ```python blocks run in a fresh ``python`` subprocess, ```bash blocks with ``bash -euo pipefail``;
  each in its own temporary folder laid out like the checkout (``examples`` and ``benchmarks`` are
  links to the real folders, ``docs`` is an empty folder for outputs), with this checkout first on
  ``PYTHONPATH``, under a timeout;
- ```text blocks (output, tables, formulas) are not run;
- a block whose first line is ``# not run by the tests: <reason>`` is skipped with that reason;
- a python block whose first line is ``# setup for the blocks below`` runs as it is, and a python
  block whose first line is ``# continued from the setup block above`` runs after the latest such
  setup block of the same file, in one process (so a page can define its model once, visibly);
- any other language, or a fence without one, fails the collection test: every block must be
  runnable, marked, or text.

A block is marked ``slow`` when it trains or runs a script (``fit(``, ``.train()``, ``examples/``,
``benchmarks/``, ``farms-lightning``): those take more than a few seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP_MARK = "# not run by the tests:"
SETUP_MARK = "# setup for the blocks below"
CONTINUED_MARK = "# continued from the setup block above"
RUNNERS = {"python", "bash"}
NOT_RUN = {"text"}
SLOW_SIGNS = ("fit(", ".train()", "examples/", "benchmarks/", "farms-lightning")
TIMEOUT_S = 300


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    setup: str = ""  # code of the python blocks this one continues

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        lines = self.code.strip().splitlines()
        return lines[0].strip() if lines else ""


def collect_blocks() -> list[Block]:
    blocks = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        setup = ""
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            body = textwrap.dedent(match.group("body"))
            block = Block(path, line, match.group("lang").strip(), body)
            if block.lang == "python":
                if block.first_line.startswith(SETUP_MARK):
                    setup = block.code
                elif block.first_line.startswith(CONTINUED_MARK):
                    block.setup = setup
            blocks.append(block)
    return blocks


BLOCKS = collect_blocks()


def test_every_block_is_runnable_marked_or_text() -> None:
    bad = []
    for block in BLOCKS:
        if block.lang not in RUNNERS | NOT_RUN:
            bad.append(f"{block.id}: unknown block language {block.lang!r} (use python, bash or text)")
        elif block.first_line.startswith(SKIP_MARK) and not block.first_line[len(SKIP_MARK):].strip():
            bad.append(f"{block.id}: the skip marker gives no reason")
        elif block.first_line.startswith(CONTINUED_MARK) and not block.setup.strip():
            bad.append(f"{block.id}: no setup block above it")
    assert not bad, "\n".join(bad)


def test_docs_links_stay_inside_the_repository() -> None:
    bad = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)#\s]+)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not (resolved.exists() or target.endswith("tensorboard.png")):
                bad.append(f"{path.relative_to(ROOT)}: {target}")
    assert not bad, "links that leave the repository or point nowhere:\n" + "\n".join(bad)


def _params() -> list:
    params = []
    for block in BLOCKS:
        if block.lang not in RUNNERS:
            continue
        marks = []
        if block.first_line.startswith(SKIP_MARK):
            marks.append(pytest.mark.skip(reason=block.first_line[len(SKIP_MARK):].strip()))
        elif any(sign in block.setup + block.code for sign in SLOW_SIGNS):
            marks.append(pytest.mark.slow)
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


@pytest.mark.parametrize("block", _params())
def test_block_runs(block: Block, tmp_path: Path) -> None:
    for name in ("examples", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    (tmp_path / "docs").mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if block.lang == "python":
        command = [sys.executable, "-c", block.setup + "\n" + block.code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    try:
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} ran longer than {TIMEOUT_S} s")
    assert result.returncode == 0, (f"{block.id} exited {result.returncode}\n--- code\n{block.code}\n"
                                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
