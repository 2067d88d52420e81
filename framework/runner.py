"""`mesh run`: services by `module:attr`, served in this process or in N supervised workers.

One process: `run_services` (from `transport.process`, so that `Service.run` can use it
without importing this module). Several: `run_workers` starts N copies of the same
`mesh run` as child processes, like `uvicorn --workers`, and supervises them with
`supervise`: a crashed worker is restarted after a delay that doubles while it keeps
crashing (`Backoff`), and SIGTERM/SIGINT stops every worker gracefully (SIGTERM, the
grace period, then SIGKILL). Replicas share their queue groups and durable consumers, so
N workers are the same scale-out as N machines. `mesh up` supervises its service
processes with the same `Child` and `supervise`.

Nothing here imports `framework.service`: services are recognised by shape (`Servable`).
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import anyio
from anyio.abc import ByteReceiveStream, Process

from .transport.process import SUPERVISOR_PID_ENV, Servable, run_services, serve_until_signal

__all__ = [
    "Backoff",
    "Child",
    "Servable",
    "load_service",
    "run_services",
    "run_workers",
    "say",
    "serve_until_signal",
    "stop_children",
    "supervise",
    "worker_command",
]

WORKER_ENV = "MESH_WORKER"  # 1..N in each worker's environment, for its logs
USAGE_EXIT = 2  # `mesh` exit codes that restarting cannot fix: bad arguments or specs,
CONFIG_EXIT = 8  # and a configuration conflict (a consumer another program owns)
NOT_RESTARTED = frozenset({USAGE_EXIT, CONFIG_EXIT})


def load_service(spec: str) -> Servable:
    """`module:attr` (or `module` with a `service` attribute) to the Service it names."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    target: Any = getattr(module, attr or "service", None)
    if not isinstance(target, Servable):
        raise ValueError(f"{spec!r} is not a framework.Service (got {type(target).__name__})")
    return target


# --- supervising child processes ----------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Restart delays for a crashed child, so a crash loop does not spin.

    The n-th crash in a row waits `first * 2**(n-1)` seconds, at most `limit`; a child
    that ran for `stable` seconds or longer before it died starts the count again.
    """

    first: float = 0.5
    limit: float = 30.0
    stable: float = 10.0

    def delay(self, crashes: int) -> float:
        """Seconds to wait before the restart after `crashes` crashes in a row (>= 1)."""
        return float(min(self.limit, self.first * 2 ** max(0, crashes - 1)))


def say(text: str, out: IO[str]) -> None:
    """A supervisor's own line, `mesh: <text>`, flushed at once."""
    print(f"mesh: {text}", file=out, flush=True)


async def _pump(stream: ByteReceiveStream, prefix: str, out: IO[str]) -> None:
    """Copy a child's output to `out` line by line, each line behind `prefix`."""
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            out.write(prefix + line.decode("utf-8", "replace") + "\n")
        out.flush()
    if buffer:
        out.write(prefix + buffer.decode("utf-8", "replace") + "\n")


class Child:
    """One supervised process: restarted with `backoff` whenever it dies, until `stop()`.

    `argv` and `env` start it, in a session of its own (so a terminal's Ctrl-C reaches
    only the supervisor, which stops children in order). With a `prefix`, its output is
    copied to `out` behind that prefix; without one it writes to our stdout/stderr.
    Create it inside the event loop that supervises it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        out: IO[str],
        prefix: str | None = None,
        backoff: Backoff = Backoff(),  # frozen: one shared default is safe
        fatal_codes: frozenset[int] = NOT_RESTARTED,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.out = out
        self.prefix = prefix
        self.backoff = backoff
        self.fatal_codes = fatal_codes
        self.failure: int | None = None  # the exit code that ended restarts, if any
        self.process: Process | None = None
        self.starts = 0
        self._stop = anyio.Event()
        self.finished = anyio.Event()

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called: the child is not restarted any more."""
        return self._stop.is_set()

    async def keep_running(self) -> None:
        """Start the process, and start it again after each exit until `stop()`."""
        crashes = 0
        try:
            while not self.stopping:
                began = time.monotonic()
                code = await self._run_once()
                if self.stopping:
                    return
                if code in self.fatal_codes:
                    self.failure = code
                    say(
                        f"{self.name} exited with code {code}; not restarted (see its error)",
                        self.out,
                    )
                    return
                crashes = 1 if time.monotonic() - began >= self.backoff.stable else crashes + 1
                delay = self.backoff.delay(crashes)
                say(f"{self.name} exited with code {code}; restarting it in {delay:g} s", self.out)
                with anyio.move_on_after(delay):
                    await self._stop.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self.kill()  # never leave a process behind
            self.finished.set()

    async def _run_once(self) -> int:
        self.process = await anyio.open_process(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.prefix is not None else None,
            stderr=subprocess.STDOUT if self.prefix is not None else None,
            start_new_session=True,
        )
        self.starts += 1
        if self.stopping:  # stop() came while we were starting it
            self.process.terminate()
        elif self.starts > 1 or self.prefix is None:
            say(f"{self.name} started (pid {self.process.pid})", self.out)
        if self.prefix is not None and self.process.stdout is not None:
            await _pump(self.process.stdout, self.prefix, self.out)
        return await self.process.wait()

    def stop(self) -> None:
        """Do not restart any more, and ask the running process to stop (SIGTERM)."""
        self._stop.set()
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        process = self.process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


async def stop_children(children: Sequence[Child], grace: float) -> None:
    """SIGTERM to every child, `grace` + 2 seconds for all to exit, then SIGKILL."""
    for child in children:
        child.stop()
    with anyio.move_on_after(grace + 2):
        for child in children:
            await child.finished.wait()
    for child in children:
        await child.kill()


async def supervise(
    children: Sequence[Child],
    *,
    grace: float,
    out: IO[str],
    started: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> str:
    """Keep `children` running until SIGTERM/SIGINT, then stop them all; return the reason.

    A child that exits with one of its `fatal_codes` (a configuration error restarting
    cannot fix) stops the others too, instead of a crash loop. `started`, when given,
    runs alongside (e.g. to announce readiness). Children never outlive this call.
    """
    reason = ""
    done = anyio.Event()

    def finish(why: str) -> None:
        nonlocal reason
        reason = reason or why
        done.set()

    async def watch(child: Child) -> None:
        await child.finished.wait()
        if child.failure is not None:
            finish(f"{child.name} failed")

    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as task_group:
                for child in children:
                    task_group.start_soon(child.keep_running)
                    task_group.start_soon(watch, child)
                if started is not None:
                    task_group.start_soon(started)
                task_group.start_soon(_first_signal, signals, finish)
                await done.wait()
                say(f"{reason}: stopping {', '.join(c.name for c in children)}", out)
                await stop_children(children, grace)
                task_group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await stop_children(children, grace)
    return reason


async def _first_signal(signals: Any, finish: Callable[[str], None]) -> None:
    async for signum in signals:
        finish(signal.Signals(signum).name)
        return


# --- mesh run --workers ------------------------------------------------------------------


def worker_command(
    specs: Sequence[str], *, url: str | None, grace: float, app_dir: str
) -> list[str]:
    """The command line of one worker: the same `mesh run`, with one process."""
    argv = [sys.executable, "-m", "framework.cli", "run", *specs]
    argv += ["--grace", repr(grace), "--app-dir", os.path.abspath(app_dir)]
    return argv + (["--url", url] if url else [])


def run_workers(
    specs: Sequence[str],
    workers: int,
    *,
    url: str | None = None,
    grace: float = 10.0,
    app_dir: str = ".",
    out: IO[str] = sys.stderr,
) -> int:
    """Run `workers` processes of the services `specs` until SIGTERM/SIGINT (exit code 0),
    or until a worker exits with a code restarting cannot fix (that code).

    `url`: NATS server URL(s) passed on to each worker (default: their `NATS_URL`);
    `grace`: seconds each worker's in-flight work gets on shutdown; `app_dir`: where the
    workers import the service modules from; `out`: where the supervisor reports.
    """
    argv = worker_command(specs, url=url, grace=grace, app_dir=app_dir)
    env = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid()), "PYTHONUNBUFFERED": "1"}

    async def main() -> int:
        children = [
            Child(f"worker {n}", argv, env={**env, WORKER_ENV: str(n)}, out=out)
            for n in range(1, workers + 1)
        ]
        say(f"starting {workers} workers of {' '.join(specs)} (pid {os.getpid()})", out)
        await supervise(children, grace=grace, out=out)
        say("stopped", out)
        failures = [c.failure for c in children if c.failure is not None]
        return failures[0] if failures else 0

    return anyio.run(main, backend="asyncio")
