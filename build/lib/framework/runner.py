"""Run services in one process until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import importlib
import os
import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import anyio
import structlog

from .service import Service

__all__ = ["load_service", "run_services", "serve_until_signal"]

_log = structlog.get_logger("framework.runner")


def load_service(spec: str) -> Service:
    """`module:attr` (or `module` with a `service` attribute) to a Service object."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    target: Any = getattr(module, attr or "service", None)
    if not isinstance(target, Service):
        raise ValueError(f"{spec!r} is not a framework.Service (got {type(target).__name__})")
    return target


async def serve_until_signal(
    services: Sequence[Service], url: str | Sequence[str] | None = None, *, grace: float = 10.0
) -> None:
    """Signals are watched from the start, so a service still waiting for NATS stops too.

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
    """`mesh up` starts services in sessions of their own (so Ctrl-C reaches only it);
    should the supervisor itself die without stopping them, they stop on their own
    rather than live on as orphans."""
    supervisor = int(os.environ.get("MESH_SUPERVISOR_PID", "0") or 0)
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
    services: Sequence[Service], url: str | Sequence[str] | None = None, *, grace: float = 10.0
) -> None:
    from .observability.logging import configure_logging
    from .observability.tracing import configure_telemetry

    configure_logging()
    configure_telemetry("+".join(service.name for service in services))
    anyio.run(
        lambda: serve_until_signal(services, url, grace=grace),
        backend="asyncio",
        backend_options=_backend_options(),
    )
