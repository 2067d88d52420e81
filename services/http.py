"""The shop's HTTP processes, run the way `mesh up` runs services: the gateway, the dashboard.

`mesh up` starts `module:attr` services (anything with a `name` and a `serve(url)`), one
process each. An ASGI app is not a service, so `HttpService` wraps one: it serves the
app with uvicorn inside the process's event loop and, beside it, a framework `Service`
of the same name that answers the NATS service API with the app's URL in its metadata.
So `mesh up` knows when it is ready, restarts it when it dies, stops it with the rest,
and `mesh ls` and the dashboard list it:

    [tool.mesh]
    services = [..., "services.http:gateway", "services.http:dashboard"]

`GATEWAY_HOST`/`GATEWAY_PORT` (default 127.0.0.1:8000) and `DASHBOARD_HOST`/
`DASHBOARD_PORT` (default 127.0.0.1:8484) say where they listen.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from framework import Service

__all__ = ["HttpService", "dashboard", "gateway"]


class HttpService:
    """An ASGI app served by uvicorn, visible on the mesh as a service named `name`.

    `app`: builds the app (called in the serving process, so its imports stay there);
    `host`/`port`: where it listens, from the environment variables `<NAME>_HOST` and
    `<NAME>_PORT` when set.
    """

    def __init__(
        self,
        name: str,
        description: str,
        app: Callable[[], Any],
        *,
        host: str = "127.0.0.1",
        port: int,
    ) -> None:
        self.name = name
        self.description = description
        self.app = app
        prefix = name.upper()
        self.host = os.environ.get(f"{prefix}_HOST", host)
        self.port = int(os.environ.get(f"{prefix}_PORT", str(port)))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @asynccontextmanager
    async def serve(
        self, url: str | Sequence[str] | None = None, /, *, grace: float = 10.0
    ) -> AsyncIterator[HttpService]:
        """Serve until the block exits: the app on HTTP, the service on NATS."""
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # the mesh's runner handles SIGTERM/SIGINT, for every service alike

        config = uvicorn.Config(
            self.app(), host=self.host, port=self.port, log_level="warning", lifespan="on"
        )
        server = Server(config)
        metadata = {"url": self.url, "kind": "http"}
        presence = Service(self.name, "1.0.0", self.description, metadata=metadata)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve)
            await _started(server)
            try:
                async with presence.serve(url, grace=grace):
                    print(f"{self.name}: {self.url}", flush=True)
                    yield self
            finally:
                server.should_exit = True


async def _started(server: Any) -> None:
    """Until uvicorn listens (it exits the process itself if it cannot)."""
    with anyio.fail_after(30):
        while True:  # uvicorn says so with a flag, not an event
            if server.started:
                return
            await anyio.sleep(0.05)


def _gateway_app() -> Any:
    from services.gateway import app

    return app


def _dashboard_app() -> Any:
    from framework.web import create_dashboard

    trace_file = os.environ.get("MESH_TRACE_FILE")
    return create_dashboard(
        host=dashboard.host, trace_file=Path(trace_file) if trace_file else None
    )


gateway = HttpService(
    "gateway", "The shop's HTTP edge: orders and their events over HTTP", _gateway_app, port=8000
)
dashboard = HttpService(
    "dashboard", "The live view of the mesh (mesh dashboard)", _dashboard_app, port=8484
)
