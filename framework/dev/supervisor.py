"""`mesh up`: a local NATS server plus services as separate processes, one command.

The services come from the project's configuration (`dev.project`) or `--service`
flags; nothing here knows any particular service. Children get colored `[name]`
prefixes on their output, a readiness line appears once every service answers
`$SRV.PING`, a crashed service is restarted with backoff (`runner.Child`), and Ctrl-C /
SIGTERM stops everything: services first (they drain), then the server. No Docker needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio

from ..runner import Child, say, supervise
from ..transport.process import SUPERVISOR_PID_ENV
from .devserver import NatsServer

__all__ = ["MESH_DIR", "MeshSpec", "down", "up", "up_detached"]

MESH_DIR = Path(".mesh")
PID_FILE = MESH_DIR / "mesh.pid"
LOG_FILE = MESH_DIR / "mesh.log"
TRACE_FILE = MESH_DIR / "traces.jsonl"
_COLORS = ("36", "35", "33", "32", "34", "31")


@dataclass(frozen=True)
class MeshSpec:
    """What `mesh up` starts, run from the project root (paths are relative to it).

    `services`: `module:attr` of each service, one process each; `names`: their service
    names, in the same order (for readiness and output prefixes); `config`: the
    nats-server config file (None: JetStream stores under `.mesh/jetstream`); `port`:
    the client port; `ready_timeout`: seconds to wait for every service to answer;
    `grace`: seconds each service gets to drain on shutdown; `color`: colored prefixes.
    """

    services: Sequence[str]
    names: Sequence[str]
    config: Path | None = None
    port: int = 4222
    ready_timeout: float = 30.0
    grace: float = 10.0
    color: bool = True


def _prefix(name: str, index: int, color: bool, width: int) -> str:
    label = f"[{name}]".ljust(width + 2)
    return f"\033[{_COLORS[index % len(_COLORS)]}m{label}\033[0m " if color else f"{label} "


async def _wait_ready(url: str, names: set[str], timeout: float) -> bool:
    from ..client import connect

    with anyio.move_on_after(timeout):
        async with connect(url, name="mesh-up") as client:
            while True:
                seen = {ping.name for ping in await client.ping(timeout=0.3)}
                if names <= seen:
                    return True
                await anyio.sleep(0.2)
    return False


def _children(spec: MeshSpec, url: str, out: IO[str]) -> list[Child]:
    env = {**os.environ, "NATS_URL": url, "PYTHONUNBUFFERED": "1"}
    env.setdefault("LOG_FORMAT", "console")
    # every service appends its spans here, so a demo can show one order's whole trace
    env.setdefault("MESH_TRACE_FILE", str(TRACE_FILE.resolve()))
    env[SUPERVISOR_PID_ENV] = str(os.getpid())  # children stop if we die unannounced
    labels = list(spec.names)
    width = max(len(label) for label in labels)
    return [
        Child(
            label,
            [sys.executable, "-m", "framework.cli", "run", service],
            env=env,
            out=out,
            prefix=_prefix(label, index, spec.color, width),
        )
        for index, (service, label) in enumerate(zip(spec.services, labels, strict=True))
    ]


async def _run(spec: MeshSpec, server: NatsServer, out: IO[str]) -> int:
    children = _children(spec, server.url, out)
    names = {child.name for child in children}

    async def announce() -> None:
        started = time.monotonic()
        if await _wait_ready(server.url, names, spec.ready_timeout):
            took = time.monotonic() - started
            listed = ", ".join(child.name for child in children)
            say(f"ready: {listed} answer $SRV.PING ({took:.1f}s); Ctrl-C stops", out)
        else:
            say(f"not every service answered within {spec.ready_timeout:g}s", out)

    try:
        await supervise(children, grace=spec.grace, out=out, started=announce)
    finally:
        server.stop()
        say("stopped", out)
    return 0


def _server(spec: MeshSpec) -> NatsServer:
    store = None if spec.config is not None else MESH_DIR / "jetstream"
    return NatsServer(
        spec.port,
        config_file=spec.config,
        store_dir=store,
        log_file=MESH_DIR / "nats.log",
        own_session=True,
    )


def up(spec: MeshSpec, out: IO[str] = sys.stdout) -> int:
    """Start the server and the services; return once a signal has stopped them all."""
    from ..observability.logging import configure_logging

    configure_logging(level="WARNING")
    MESH_DIR.mkdir(exist_ok=True)
    server = _server(spec)
    server.start()
    say(f"nats-server ready at {server.url} (JetStream store under {MESH_DIR}/)", out)
    return anyio.run(_run, spec, server, out, backend="asyncio")


def up_detached(spec: MeshSpec, args: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """Start `mesh up ARGS` in the background (output in .mesh/mesh.log), wait for readiness."""
    from ..observability.logging import configure_logging

    configure_logging(level="ERROR")  # connection attempts while NATS starts are expected
    MESH_DIR.mkdir(exist_ok=True)
    if PID_FILE.exists() and _alive(int(PID_FILE.read_text() or 0)):
        say(f"already running (pid {PID_FILE.read_text().strip()}); `mesh down` stops it", out)
        return 1
    with LOG_FILE.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "framework.cli", "up", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    PID_FILE.write_text(str(process.pid))
    url = f"nats://127.0.0.1:{spec.port}"
    names = set(spec.names)
    if not anyio.run(_wait_after_start, url, names, spec.ready_timeout):
        say(f"not ready within {spec.ready_timeout:g}s; see {LOG_FILE}", out)
        return 1
    say(f"mesh running in the background (pid {process.pid}); logs in {LOG_FILE}", out)
    return 0


async def _wait_after_start(url: str, names: set[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return await _wait_ready(url, names, deadline - time.monotonic())
        except Exception:
            await anyio.sleep(0.3)  # the server is not up yet
    return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def down(out: IO[str] = sys.stdout, timeout: float = 20.0) -> int:
    """Stop the background mesh of this project (SIGTERM, SIGKILL after `timeout`)."""
    if not PID_FILE.exists():
        say("no background mesh (no .mesh/mesh.pid)", out)
        return 0
    pid = int(PID_FILE.read_text().strip() or 0)
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
            _reap(pid)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    PID_FILE.unlink(missing_ok=True)
    say("stopped", out)
    return 0


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
