"""Every example in `mesh --help` and `mesh COMMAND --help` works against the sample mesh.

The examples are read from the help text itself (every parser, subcommands included), so
an example added to a command's help is tested here without further work. The sample
mesh is what `just up` starts (this repository's `[tool.mesh]` services), started with
`mesh up` in a temp directory; each example runs in bash as a user would type it, with
`NATS_URL` (and any `--url` in it) pointing at that mesh. Commands that serve until
stopped (`run`, `up`) are started, awaited and stopped with a signal, and must exit 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from support.cli import ROOT, Running, project_env, sample_project

from framework import connect, list_dead_letters
from framework.cli.main import build_parser
from framework.dev.devserver import free_port
from framework.testing import eventually

SERVING = {"run", "up"}  # commands that serve until a signal stops them
BIN = str(Path(sys.executable).parent)  # where this environment's `mesh` lives


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def help_examples() -> list[str]:
    """The lines under `examples:` in every command's help, in help order."""
    found: list[str] = []
    for parser in _parsers(build_parser()[0]):
        text = parser.format_help()
        if "\nexamples:\n" not in text:
            continue
        block = text.split("\nexamples:\n", 1)[1]
        for line in block.splitlines():
            if not line.startswith("  "):
                break
            found.append(line.strip())
    return list(dict.fromkeys(found))  # `mesh --help` repeats a few


def command_of(example: str) -> str:
    """The `mesh` subcommand an example runs (after `mesh` and any global options)."""
    words = shlex.split(example.split("|")[-1])
    words = words[words.index("mesh") + 1 :]
    while words and words[0].startswith("--"):
        words = words[2:]  # `--url URL`, `--timeout SECONDS`
    return words[0]


def shell_env(url: str, cwd: Path) -> dict[str, str]:
    env = project_env(NATS_URL=url, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env["MESH_OUTBOX"] = str(cwd / "outbox.jsonl")
    # the shop's HTTP processes: ports of their own, so two meshes (and other tests) can run
    env["GATEWAY_PORT"], env["DASHBOARD_PORT"] = str(free_port()), str(free_port())
    return env


def in_bash(command: str, cwd: Path, env: dict[str, str]) -> Running:
    """A bash command line in the background, as a user types it, its output collected."""
    return Running(["bash", "-c", f"exec {command}"], cwd, env)


@pytest.fixture(scope="module")
def sample_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The sample mesh, started by `mesh up` as `just up` does, with one dead letter."""
    directory = sample_project(tmp_path_factory.mktemp("sample-mesh"))
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    mesh = in_bash(f"mesh up --port {port} --no-color", directory, shell_env(url, directory))
    try:
        anyio.run(eventually, lambda: mesh.count("mesh: ready") > 0, 60, "the sample mesh")
        anyio.run(_dead_letter, url)  # for `mesh dlq show 1` and `mesh dlq replay 1`
        yield url, directory
    finally:
        assert mesh.stop(timeout=40) == 0, "".join(mesh.lines)


async def _dead_letter(url: str) -> None:
    async with connect(url) as client:
        await client.publish("order.created.v1", {"not": "an order"})  # payments rejects it

        async def dead() -> bool:
            return bool(await list_dead_letters(client))

        await eventually(dead, 30, "a dead letter")


def _run_quick(example: str, url: str, cwd: Path) -> None:
    done = subprocess.run(
        ["bash", "-c", example],
        cwd=cwd,
        env=shell_env(url, cwd),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{example}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr


def _expected_starts(example: str) -> int:
    words = shlex.split(example)
    workers = int(words[words.index("--workers") + 1]) if "--workers" in words else 1
    return workers * sum(":" in word for word in words)


def _run_serving(example: str, url: str, tmp_path: Path) -> None:
    if command_of(example) == "run":
        process = in_bash(example, ROOT, shell_env(url, tmp_path))
        expected, ready = _expected_starts(example), "service started"
    else:  # `mesh up ...` in a project of its own, on a port of its own
        cwd = sample_project(tmp_path / "project")
        port = free_port()
        process = in_bash(f"{example} --port {port}", cwd, shell_env(url, cwd))
        expected, ready = 1, "mesh: ready"
        if "--detach" in example:
            assert process.proc.wait(timeout=90) == 0, "".join(process.lines)
            _run_quick("mesh down", url, cwd)
            return
    try:
        anyio.run(eventually, lambda: process.count(ready) >= expected, 60, example)
    finally:
        code = process.stop(signal.SIGTERM if command_of(example) == "run" else signal.SIGINT, 40)
    assert code == 0, "".join(process.lines)
    assert not any("Traceback" in line for line in process.lines), "".join(process.lines)


EXAMPLES = help_examples()


def test_help_has_examples_for_the_main_commands():
    commands = {command_of(example) for example in EXAMPLES}
    assert {"run", "call", "ls", "info", "stats", "publish", "dlq", "up", "down"} <= commands


@pytest.mark.parametrize("example", EXAMPLES)
def test_help_example_runs(example: str, sample_mesh: tuple[str, Path], tmp_path: Path):
    url, directory = sample_mesh
    example = re.sub(r"--url \S+", f"--url {url}", example)
    if command_of(example) in SERVING:
        _run_serving(example, url, tmp_path)
    elif command_of(example) == "down":  # stops what `mesh up --detach` started
        cwd = sample_project(tmp_path / "project")
        port = free_port()
        _run_quick(f"mesh up --detach --port {port}", url, cwd)
        _run_quick(example, url, cwd)
        assert not (cwd / ".mesh" / "mesh.pid").exists()
    else:
        _run_quick(example, url, directory)
