"""The README's code runs as written, in a project that is not this repository.

Every ```python block in README.md is preceded by an HTML comment that says how the
block is exercised (the README explains the convention to readers):

- `<!-- test: save NAME.py -->`        the block is a module that later blocks import;
- `<!-- test: background NAME.py -->`  saved, then started as a process (a service) that
                                       later blocks talk to; stopped with SIGTERM at the end;
- `<!-- test: run -->`                 a script, run to completion (exit 0);
- `<!-- test: pytest -->`              a test file, run by pytest in that project.

Each block runs in a fresh temporary directory holding only the files earlier blocks
saved: no pyproject settings of this repository (so no `asyncio_mode`), only the
installed package, against a real nats-server given by `NATS_URL`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(
    r"(?:<!--\s*test:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```",
    re.S,
)
ACTIONS = {"save", "background", "run", "pytest"}


@dataclass(frozen=True)
class Block:
    line: int
    action: str
    argument: str
    code: str


def python_blocks(text: str) -> list[Block]:
    blocks = []
    for match in BLOCK.finditer(text):
        if match.group("lang") != "python":
            continue
        action, _, argument = (match.group("directive") or "").partition(" ")
        line = text.count("\n", 0, match.start("code"))
        blocks.append(Block(line, action, argument.strip(), match.group("code")))
    return blocks


def test_every_python_block_says_how_it_is_tested() -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has python blocks"
    untested = [f"README.md:{b.line}" for b in blocks if b.action not in ACTIONS]
    assert untested == [], "python blocks without a `<!-- test: ... -->` directive"


def test_the_block_parser_reads_directives() -> None:
    text = (
        "x\n<!-- test: save a.py -->\n```python\nA = 1\n```\n```bash\nls\n```\n```python\nB\n```\n"
    )
    blocks = python_blocks(text)
    assert [(b.action, b.argument, b.code) for b in blocks] == [
        ("save", "a.py", "A = 1\n"),
        ("", "", "B\n"),
    ]


def _env(nats_url: str, project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NATS_"))}
    env.update(NATS_URL=nats_url, PYTHONPATH=str(project), LOG_LEVEL="WARNING")
    return env


def _wait_started(process: subprocess.Popen[str], log: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        if "service started" in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start:\n{log.read_text()}")


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            assert process.wait(timeout=15) == 0, "a README service did not stop cleanly"
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _run(args: list[str], project: Path, env: dict[str, str], where: str) -> None:
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{where} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _start(block: Block, project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    log = project / f"{block.argument}.log"
    env = {**env, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, block.argument],
            cwd=project,
            env=env,
            stdout=out,
            stderr=out,
            text=True,
        )
    _wait_started(process, log, f"README.md:{block.line} ({block.argument})")
    return process


def test_readme_blocks_run_as_written(
    nats_url: str, tmp_path: Path, background: list[subprocess.Popen[str]]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = _env(nats_url, project)
    for number, block in enumerate(python_blocks(README.read_text())):
        where = f"README.md:{block.line}"
        if block.action in ("save", "background"):
            (project / block.argument).write_text(block.code)
        if block.action == "background":
            background.append(_start(block, project, env))
        elif block.action == "run":
            script = project / f"block_{number}.py"
            script.write_text(block.code)
            _run([sys.executable, script.name], project, env, where)
        elif block.action == "pytest":
            test_file = project / f"test_block_{number}.py"
            test_file.write_text(block.code)
            _run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file.name],
                project,
                env,
                where,
            )
