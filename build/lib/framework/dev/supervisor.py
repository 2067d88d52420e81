"""`mesh up`: a local NATS server plus services as separate processes, one command.

Children get colored `[name]` prefixes on their output, a readiness line appears
once every service answers `$SRV.PING`, and Ctrl-C / SIGTERM stops everything:
services first (they drain), then the server. No Docker needed.
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
from typing import IO, Any

import anyio
from anyio.abc import Process

from .devserver import NatsServer

__all__ = ["DEFAULT_SERVICES", "MeshSpec", "down", "up", "up_detached"]

DEFAULT_SERVICES = (
    "services.orders:service",
    "services.payments:service",
    "services.notifications:service",
)
MESH_DIR = Path(".mesh")
PID_FILE = MESH_DIR / "mesh.pid"
LOG_FILE = MESH_DIR / "mesh.log"
TRACE_FILE = MESH_DIR / "traces.jsonl"
_COLORS = ("36", "35", "33", "32", "34", "31")


@dataclass(frozen=True)
class MeshSpec:
    services: Sequence[str] = DEFAULT_SERVICES
    config: Path = Path("nats.conf")
    port: int = 4222
    ready_timeout: float = 30.0
    grace: float = 10.0
    color: bool = True


def _name(spec: str) -> str:
    module = spec.partition(":")[0]
    return module.rsplit(".", 1)[-1]


def _prefix(name: str, index: int, color: bool, width: int) -> str:
    label = f"[{name}]".ljust(width + 2)
    return f"\033[{_COLORS[index % len(_COLORS)]}m{label}\033[0m " if color else f"{label} "


def _say(text: str, out: IO[str]) -> None:
    print(f"mesh: {text}", file=out, flush=True)


async def _pump(stream: Any, prefix: str, out: IO[str]) -> None:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            out.write(prefix + line.decode("utf-8", "replace") + "\n")
        out.flush()
    if buffer:
        out.write(prefix + buffer.decode("utf-8", "replace") + "\n")


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


class _Child:
    """One service process, restarted when it dies unless the mesh is stopping."""

    def __init__(self, spec: str, prefix: str, env: dict[str, str], out: IO[str]) -> None:
        self.spec = spec
        self.name = _name(spec)
        self.prefix = prefix
        self.env = env
        self.out = out
        self.process: Process | None = None
        self.stopping = False

    async def keep_running(self) -> None:
        while not self.stopping:
            self.process = await anyio.open_process(
                [sys.executable, "-m", "framework.cli", "run", self.spec],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            )
            await _pump(self.process.stdout, self.prefix, self.out)
            code = await self.process.wait()
            if self.stopping:
                return
            _say(f"{self.name} exited with code {code}; restarting it in 1 s", self.out)
            await anyio.sleep(1.0)


async def _stop(children: Sequence[_Child], grace: float) -> None:
    for child in children:
        child.stopping = True
    processes = [c.process for c in children if c.process is not None]
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    with anyio.move_on_after(grace + 2):
        for process in processes:
            await process.wait()
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _run(spec: MeshSpec, server: NatsServer, out: IO[str]) -> int:
    env = {**os.environ, "NATS_URL": server.url, "PYTHONUNBUFFERED": "1"}
    env.setdefault("LOG_FORMAT", "console")
    # every service appends its spans here, so `mesh demo` can show one order's whole trace
    env.setdefault("MESH_TRACE_FILE", str(TRACE_FILE.resolve()))
    env["MESH_SUPERVISOR_PID"] = str(os.getpid())  # children stop if we die unannounced
    names = [_name(s) for s in spec.services]
    width = max(len(n) for n in names)
    children = [
        _Child(service, _prefix(name, index, spec.color, width), env, out)
        for index, (service, name) in enumerate(zip(spec.services, names, strict=True))
    ]
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as task_group:
                for child in children:
                    task_group.start_soon(child.keep_running)

                async def announce() -> None:
                    started = time.monotonic()
                    if await _wait_ready(server.url, set(names), spec.ready_timeout):
                        took = time.monotonic() - started
                        _say(
                            f"ready: {', '.join(names)} answer $SRV.PING ({took:.1f}s); Ctrl-C stops",
                            out,
                        )
                    else:
                        _say(f"not every service answered within {spec.ready_timeout:g}s", out)

                task_group.start_soon(announce)
                async for signum in signals:
                    _say(f"{signal.Signals(signum).name}: stopping services, then NATS", out)
                    break
                await _stop(children, spec.grace)
                task_group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(children, spec.grace)
        server.stop()
        _say("stopped", out)
    return 0


def up(spec: MeshSpec, out: IO[str] = sys.stdout) -> int:
    from ..observability.logging import configure_logging

    configure_logging(level="WARNING")
    MESH_DIR.mkdir(exist_ok=True)
    server = NatsServer(
        spec.port, config_file=spec.config, log_file=MESH_DIR / "nats.log", own_session=True
    )
    server.start()
    _say(f"nats-server ready at {server.url} (JetStream store under {MESH_DIR}/)", out)
    return anyio.run(_run, spec, server, out, backend="asyncio")


def up_detached(spec: MeshSpec, args: Sequence[str], out: IO[str] = sys.stdout) -> int:
    """Start `mesh up` in the background (output in .mesh/mesh.log) and wait for readiness."""
    from ..observability.logging import configure_logging

    configure_logging(level="ERROR")  # connection attempts while NATS starts are expected
    MESH_DIR.mkdir(exist_ok=True)
    if PID_FILE.exists() and _alive(int(PID_FILE.read_text() or 0)):
        _say(f"already running (pid {PID_FILE.read_text().strip()}); `mesh down` stops it", out)
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
    ready = anyio.run(_wait_after_start, url, {_name(s) for s in spec.services}, spec.ready_timeout)
    if not ready:
        _say(f"not ready within {spec.ready_timeout:g}s; see {LOG_FILE}", out)
        return 1
    _say(f"mesh running in the background (pid {process.pid}); logs in {LOG_FILE}", out)
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
    if not PID_FILE.exists():
        _say("no background mesh (no .mesh/mesh.pid)", out)
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
    _say("stopped", out)
    return 0


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
