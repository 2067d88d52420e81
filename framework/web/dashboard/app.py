"""The dashboard's ASGI app: a JSON API under `/api/...`, live updates at `/api/stream`.

It reads and does only what a `mesh` CLI user can: discovery (`$SRV.*`), the JetStream
API, dead letters (show, replay, discard) and jobs, with the connection settings of the
environment. Actions are POSTs that need the `X-Mesh-Dashboard` header, which a page of
another origin cannot send without the CORS permission this app never gives; with a
loopback bind, requests must also name a loopback host (no DNS rebinding).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ...client import Client
from ...errors import NoStream, PublishError, ServiceError
from ...events.deadletter import discard_dead_letter, get_dead_letter, replay_dead_letter
from ..asyncapi import asyncapi_document
from ..edge import MeshMiddleware, error_body, http_status
from ..sse import sse
from .jobs import JobsWatch
from .sampler import Hub, Sampler

__all__ = ["ACTION_HEADER", "LOOPBACK_HOSTS", "Dashboard", "Settings", "create_app"]

STATIC = Path(__file__).parent / "static"
ACTION_HEADER = "X-Mesh-Dashboard"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
VIEWS = ("health", "services", "streams", "deadletters", "jobs", "traces")


@dataclass
class Dashboard:
    """What the routes share: the client, the sampler and its hub."""

    client: Client
    hub: Hub
    sampler: Sampler
    jobs: JobsWatch


def _json(data: Any, status: int = 200) -> Response:
    body = data if isinstance(data, bytes) else msgspec.json.encode(data)
    return Response(body, status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return Response(error_body(status, message), status_code=status, media_type="application/json")


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


async def index(request: Request) -> Response:
    """The page (static, no template): it fetches everything else itself."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def view(request: Request) -> Response:
    """`/api/<view>`: the latest sample of one view, as JSON."""
    name = request.path_params["view"]
    if name not in VIEWS:
        return _error(404, f"no view {name!r} (views: {', '.join(VIEWS)})")
    data = _dashboard(request).hub.get(name)
    return _json(data if data is not None else {})


async def stream(request: Request) -> Response:
    """Every view once, then each view again whenever it changes (server-sent events)."""
    hub = _dashboard(request).hub

    async def frames() -> AsyncIterator[Any]:
        from sse_starlette import ServerSentEvent

        seen: dict[str, int] = {}
        while True:
            changed = hub.changed()
            for name, version, data in hub.newer(seen):
                yield ServerSentEvent(data=data.decode(), event=name, id=str(version))
            await changed.wait()

    return sse(frames(), end=False)


def _letter_id(request: Request) -> int:
    letter_id: int = request.path_params["letter_id"]
    if letter_id < 1:
        raise ServiceError(404, f"no dead letter {letter_id}")
    return letter_id


async def dead_letter(request: Request) -> Response:
    """`mesh dlq show ID`: reason, error, attempts, headers and payload."""
    letter = await get_dead_letter(_dashboard(request).client, _letter_id(request))
    return _json(letter)


def _check_action(request: Request) -> None:
    if request.headers.get(ACTION_HEADER) != "1":
        raise HTTPException(403, f"actions need the {ACTION_HEADER}: 1 header (CSRF guard)")


async def replay(request: Request) -> Response:
    """`mesh dlq replay ID`: re-publish to the original subject, then remove the letter."""
    _check_action(request)
    dashboard = _dashboard(request)
    letter_id = _letter_id(request)
    letter = await get_dead_letter(dashboard.client, letter_id)
    ack = await replay_dead_letter(dashboard.client, letter_id)
    dashboard.sampler.poke()
    return _json(
        {"replayed": letter_id, "subject": letter.subject, "stream": ack.stream, "seq": ack.seq}
    )


async def discard(request: Request) -> Response:
    """Delete a dead letter for good (its event is not handled)."""
    _check_action(request)
    dashboard = _dashboard(request)
    letter_id = _letter_id(request)
    await discard_dead_letter(dashboard.client, letter_id)
    dashboard.sampler.poke()
    return _json({"discarded": letter_id})


def _job(request: Request) -> Any:
    kind, job_id = request.path_params["kind"], request.path_params["job_id"]
    client: Any = _dashboard(request).client
    if not hasattr(client, "job"):
        raise HTTPException(501, "this framework version has no background jobs")
    try:
        return client.job(kind, job_id)
    except ValueError as error:  # InvalidName: not a kind or not an id
        raise HTTPException(422, str(error)) from None


async def job_status(request: Request) -> Response:
    """`mesh jobs show KIND ID`: the job's status record."""
    return _json(await _job(request).status())


async def job_cancel(request: Request) -> Response:
    """`mesh jobs cancel KIND ID`: a queued job never runs, a running one is stopped."""
    _check_action(request)
    cancelled = await _job(request).cancel()
    message = "cancelled" if cancelled else "already finished: nothing to cancel"
    return _json({"cancelled": bool(cancelled), "message": message})


async def job_retry(request: Request) -> Response:
    """`mesh jobs retry KIND ID`: a failed or cancelled job queued again."""
    _check_action(request)
    await _job(request).retry()
    return _json({"retried": True, "message": "queued again"})


async def catalog(request: Request) -> Response:
    """The AsyncAPI 3.0 document of the services running now."""
    client = _dashboard(request).client
    infos = await client.info(timeout=0.5)
    server = client.nc.connected_url.netloc if client.nc.connected_url else None
    return _json(asyncapi_document(infos, server=server))


# --- errors --------------------------------------------------------------------------


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error(http_status(exc), exc.message)


async def _no_stream(request: Request, exc: Exception) -> Response:
    message = f"{exc} (the stream it came from is gone: discard it, or recreate the stream)"
    return _error(409, message)


async def _publish_error(request: Request, exc: Exception) -> Response:
    return _error(502, str(exc))


async def _timeout(request: Request, exc: Exception) -> Response:
    return _error(504, f"NATS did not answer in time: {exc or 'timeout'}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))


_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    ServiceError: _service_error,
    NoStream: _no_stream,
    PublishError: _publish_error,
    TimeoutError: _timeout,
    HTTPException: _http_error,
}


def routes(extra: Sequence[Route] = ()) -> list[Route | Mount]:
    """The page, the JSON API, the live stream and the static files."""
    return [
        Route("/", index),
        Route("/api/stream", stream),
        Route("/api/asyncapi", catalog),
        Route("/api/deadletters/{letter_id:int}", dead_letter),
        Route("/api/deadletters/{letter_id:int}/replay", replay, methods=["POST"]),
        Route("/api/deadletters/{letter_id:int}/discard", discard, methods=["POST"]),
        Route("/api/jobs/{kind}/{job_id:path}/cancel", job_cancel, methods=["POST"]),
        Route("/api/jobs/{kind}/{job_id:path}/retry", job_retry, methods=["POST"]),
        Route("/api/jobs/{kind}/{job_id:path}", job_status),
        *extra,
        Route("/api/{view}", view),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


@dataclass(frozen=True)
class Settings:
    """How a dashboard connects and samples (see `create_app`)."""

    url: str | Sequence[str] | None
    interval: float
    history_seconds: float
    trace_file: Path | None
    connect_timeout: float

    @property
    def shown_url(self) -> str:
        """The URL as given, for messages (the health view redacts credentials)."""
        url = self.url
        return ",".join(url) if isinstance(url, list | tuple) else str(url or "")


async def _connect(settings: Settings) -> Client:
    try:
        with anyio.fail_after(settings.connect_timeout):  # nats-py retries a dead URL forever
            return await Client.open(settings.url, name="mesh-dashboard")
    except TimeoutError:
        where = settings.shown_url or "NATS_URL"
        raise ConnectionError(f"no NATS at {where} within {settings.connect_timeout:g}s") from None


def _lifespan(settings: Settings) -> Callable[[Starlette], Any]:
    """One client, one sampler and one jobs watch per app, for as long as it runs."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = await _connect(settings)
        hub = Hub()
        sampler = Sampler(
            client,
            hub,
            interval=settings.interval,
            history_seconds=settings.history_seconds,
            trace_file=settings.trace_file,
            url=settings.shown_url,
        )
        jobs = JobsWatch(client, hub, declared=sampler.declared_job_kinds)
        sampler.extra["jobs"] = jobs.view
        app.state.dashboard = Dashboard(client, hub, sampler, jobs)
        try:
            await sampler.sample()  # every view exists before the first page asks
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(sampler.run)
                tasks.start_soon(jobs.run)
                yield
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()

    return lifespan


def create_app(
    url: str | Sequence[str] | None = None,
    *,
    interval: float = 1.0,
    history_seconds: float = 300.0,
    trace_file: Path | None = None,
    host: str = "127.0.0.1",
    connect_timeout: float = 10.0,
    extra_routes: Sequence[Route] = (),
) -> Starlette:
    """The dashboard of the mesh at `url` (default: `NATS_URL` and its credentials).

    `interval`: seconds between samples; `history_seconds`: how much consumer lag
    history the sparklines show; `trace_file`: the spans file `mesh up` writes; `host`:
    the address it will be served on (a loopback one also checks the Host header);
    `connect_timeout`: how long start-up waits for NATS before it fails;
    `extra_routes`: more routes, matched before the views.
    """
    settings = Settings(url, interval, history_seconds, trace_file, connect_timeout)
    middleware = [Middleware(MeshMiddleware, max_body=64 * 1024)]
    if host in LOOPBACK_HOSTS:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS)))
    return Starlette(
        routes=routes(extra_routes),
        middleware=middleware,
        exception_handlers=_HANDLERS,
        lifespan=_lifespan(settings),
    )
