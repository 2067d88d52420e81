"""One process serving services until SIGTERM/SIGINT, then a graceful stop.

What `Service.run()` and `mesh run` (each worker of `mesh run --workers`) execute. It
lives down here, below `service`, and takes anything shaped like a service (`Servable`)
rather than importing `Service`: that keeps the package free of the old
`service <-> runner` cycle while `Service.run` can still call it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Protocol, runtime_checkable

import anyio
import structlog

__all__ = ["SUPERVISOR_PID_ENV", "Servable", "run_services", "serve_until_signal"]

# Set by a supervisor (`mesh up`, `mesh run --workers`) in its children's environment.
SUPERVISOR_PID_ENV = "MESH_SUPERVISOR_PID"

_log = structlog.get_logger("framework.runner")


@runtime_checkable
class Servable(Protocol):
    """What this module runs: a `framework.Service` (matched by shape, not by class)."""

    @property
    def name(self) -> str:
        """The service name, used for telemetry and logs."""
        ...

    def serve(
        self, url: str | Sequence[str] | None, /, *, grace: float
    ) -> AbstractAsyncContextManager[Any]:
        """Serve inside the current event loop until the block exits."""
        ...


async def serve_until_signal(
    services: Sequence[Servable], url: str | Sequence[str] | None = None, *, grace: float = 10.0
) -> None:
    """Serve `services` until SIGTERM or SIGINT; in-flight work gets `grace` seconds.

    Signals are watched from the start, so a service still waiting for NATS stops too.
    Once serving, a signal ends the serve blocks normally (graceful: in-flight work
    finishes); only a process that never got connected is cancelled outright.
    """
    stop = anyio.Event()
    serving = False
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as task_group:

            async def serve_all() -> None:
                nonlocal serving
                async with AsyncExitStack() as stack:
                    for service in services:
                        await stack.enter_async_context(service.serve(url, grace=grace))
                    serving = True
                    await stop.wait()
                task_group.cancel_scope.cancel()  # done: stop watching signals

            task_group.start_soon(serve_all)
            task_group.start_soon(_stop_when_supervisor_dies)
            async for signum in signals:
                _log.info("stopping", signal=signal.Signals(signum).name)
                break
            stop.set()
            if not serving:
                task_group.cancel_scope.cancel()


async def _stop_when_supervisor_dies() -> None:
    """A supervisor starts its children in sessions of their own (so Ctrl-C reaches only
    it); should the supervisor die without stopping them, they stop on their own rather
    than live on as orphans."""
    supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, "0") or 0)
    if supervisor <= 0:
        return
    while _alive(supervisor):  # noqa: ASYNC110 - a pid has no event to wait on
        await anyio.sleep(1.0)
    _log.warning("supervisor is gone, stopping", supervisor_pid=supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _backend_options() -> dict[str, Any]:
    """uvloop when installed (the `uvloop` extra); plain asyncio otherwise."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def run_services(
    services: Sequence[Servable], url: str | Sequence[str] | None = None, *, grace: float = 10.0
) -> None:
    """Configure logging and telemetry, then `serve_until_signal` in a fresh event loop.

    `url`: NATS server URL(s) (default: `NATS_URL`); `grace`: seconds in-flight work
    gets to finish on shutdown.
    """
    from ..observability.logging import configure_logging
    from ..observability.tracing import configure_telemetry

    configure_logging()
    configure_telemetry("+".join(service.name for service in services))
    try:
        anyio.run(
            lambda: serve_until_signal(services, url, grace=grace),
            backend="asyncio",
            backend_options=_backend_options(),
        )
    except BaseExceptionGroup as group:
        raise sole_error(group) from None  # e.g. ConnectionFailed, not a task-group wrapper


def sole_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The one error inside (nested) task-group wrappers, else the group itself."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
