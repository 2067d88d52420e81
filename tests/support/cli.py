"""`mesh` as the tests run it: in this process, as a user's console script, or as a
subprocess (to completion, or in the background with its output collected)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from framework.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
"""This repository: its pyproject.toml names the sample shop's services."""

MESH_MODULE = (sys.executable, "-m", "framework.cli")
"""`mesh` as this environment's module: what `python -m framework.cli` runs."""


async def mesh(*argv: str) -> int:
    """`main(argv)` from async tests: it runs its own event loop, so in a thread."""
    return await anyio.to_thread.run_sync(main, list(argv))


def mesh_command() -> list[str]:
    """The installed console script, as a user would run it (else the module)."""
    script = Path(sys.executable).parent / "mesh"
    if script.is_file():
        return [str(script)]
    found = shutil.which("mesh")
    return [found] if found else list(MESH_MODULE)


def mesh_cli(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: str = "",
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """`python -m framework.cli ARGS` to its end, stdout and stderr captured as text
    (`stdin` is its whole input: it never reads the terminal pytest runs in)."""
    return subprocess.run(
        [*MESH_MODULE, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def project_env(**extra: str) -> dict[str, str]:
    """This environment plus `extra`, without PYTHONPATH: a project's modules come from
    the project's directory (its working directory), not from this repository."""
    env = {**os.environ, **extra}
    env.pop("PYTHONPATH", None)
    return env


class Running:
    """A command in the background, stdout and stderr collected line by line.

    A thread reads the output as it comes, so the pipe never fills and blocks the
    process, and a test can wait for a line (`said`) with `eventually`. With
    `new_session`, the command and whatever it starts (a script's `cmd &`) form a process
    group of their own, which `stop_group` ends as a whole.
    """

    def __init__(
        self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], new_session: bool = False
    ) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def said(self, text: str) -> bool:
        """Whether any line so far contains `text`."""
        return any(text in line for line in self.lines)

    def count(self, text: str) -> int:
        """How many lines so far contain `text`."""
        return sum(text in line for line in self.lines)

    def output(self) -> str:
        """Everything it printed so far."""
        return "".join(self.lines)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30) -> int:
        """Send `signum` (unless it has exited) and wait; killed after `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def stop_group(self, timeout: float = 30) -> None:
        """SIGTERM to every process of its group (started with `new_session`), SIGKILL to
        those left after `timeout` seconds: nothing it started outlives the test."""
        group = self.proc.pid
        deadline = time.monotonic() + timeout
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signum)
            while group_members(group) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not group_members(group):
                break
            deadline = time.monotonic() + 5
        self.proc.wait(timeout=5)
        assert not group_members(group), f"processes of group {group} survived SIGKILL"


def sample_services() -> list[str]:
    """This repository's `[tool.mesh]` services: the whole shop, as `just up` starts it."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        services: list[str] = tomllib.load(file)["tool"]["mesh"]["services"]
    return services


def sample_project(directory: Path, nats_config: str | None = None) -> Path:
    """A directory that `mesh up` starts the sample shop in (its own .mesh/ and store):
    a mesh.toml naming `sample_services()`, and `nats_config` (a path) if given."""
    directory.mkdir(parents=True, exist_ok=True)
    listed = ", ".join(f'"{spec}"' for spec in sample_services())
    config = f'nats_config = "{nats_config}"\n' if nats_config else ""
    (directory / "mesh.toml").write_text(f"services = [{listed}]\n{config}")
    return directory


def mesh_up(cwd: Path, port: int, *args: str, env: Mapping[str, str]) -> Running:
    """`mesh up` in the foreground as a user starts it, on `port`, without colours."""
    return Running([*MESH_MODULE, "up", "--port", str(port), "--no-color", *args], cwd, env)


def process_state(pid: int) -> str | None:
    """The state letter of `pid` in /proc (R, S, T, Z, ...), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]  # after the command name, which may hold spaces


def alive(pid: int) -> bool:
    """Whether `pid` runs: it exists and is not a zombie waiting to be reaped."""
    return process_state(pid) not in (None, "Z")


def group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that run (zombies left out), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def children(pid: int) -> dict[int, str]:
    """Child processes of `pid` with their command lines (from /proc)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except (OSError, IndexError, ValueError):
            continue
    return found
