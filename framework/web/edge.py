"""An HTTP edge in front of the mesh: the glue a FastAPI or Starlette app needs.

    edge = MeshEdge(name="shop-edge")
    app = FastAPI(lifespan=edge.lifespan)
    edge.install(app)

One client per app, opened by the lifespan with the connection settings of the
environment (`NATS_URL`, credentials, TLS). `install` adds one ASGI middleware and the
error handlers: an incoming `X-Request-Id` becomes the correlation id of every call the
request makes (a new one when absent, echoed in the response), a W3C `traceparent`
continues into the mesh through a SERVER span of the HTTP request, bodies are bounded,
and a `ServiceError` becomes the HTTP status a browser or a proxy understands.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..client import Client
from ..errors import BadRequest, PublishError, ServiceError
from ..observability import tracing
from ..transport import headers as h

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..events.publish import PublishAck
    from ..jobs.handle import JobHandle
    from .events import EventWatch, MeshEvent

__all__ = [
    "DEFAULT_MAX_BODY",
    "REQUEST_ID_HEADER",
    "MeshEdge",
    "MeshMiddleware",
    "correlation_id",
    "error_body",
    "http_status",
]

REQUEST_ID_HEADER = "X-Request-Id"
DEFAULT_MAX_BODY = 1024 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_log = structlog.get_logger("framework.web")
_tracer = trace.get_tracer("framework.web")
_correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mesh_correlation_id", default=None
)

# ServiceError codes a caller of the edge understands as they are; the rest are mapped.
_AS_IS = frozenset({401, 403, 404, 409, 410, 412, 413, 415, 422, 429, 501, 503})
_MAPPED = {400: 422, 408: 504, 500: 502}


def http_status(error: ServiceError) -> int:
    """The HTTP status for a mesh error.

    400 (the payload failed validation) is 422, as FastAPI answers a body it cannot
    validate; 408 (deadline exceeded) is 504, the edge's gateway timed out; 500 (a
    handler failed) is 502, the edge itself is fine; 404, 503 and the other 4xx codes
    with an HTTP meaning stay; anything else is 502 (5xx) or 400 (4xx).
    """
    code = error.code
    if code in _MAPPED:
        return _MAPPED[code]
    if code in _AS_IS:
        return code
    return 502 if code >= 500 or code < 400 else 400


def correlation_id() -> str | None:
    """The correlation id of the HTTP request being handled (None outside a request)."""
    return _correlation.get()


def error_body(status: int, message: str, *, code: int | None = None, **extra: Any) -> bytes:
    """The JSON body of every error the edge answers: `{"error": {...}}`."""
    error: dict[str, Any] = {"status": status, "message": message}
    if code is not None and code != status:
        error["mesh_code"] = code
    error.update({k: v for k, v in extra.items() if v is not None})
    request_id = correlation_id()
    if request_id:
        error["request_id"] = request_id
    return json.dumps({"error": error}).encode()


def _json_error(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    status = http_status(exc)
    return _json_error(status, error_body(status, exc.message, code=exc.code, service=exc.service))


async def _publish_error(request: Request, exc: Exception) -> Response:
    return _json_error(503, error_body(503, str(exc)))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return _json_error(exc.status_code, error_body(exc.status_code, detail), exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's RequestValidationError (malformed JSON, wrong fields) in the same shape."""
    errors: list[dict[str, Any]] = getattr(exc, "errors", lambda: [])()
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors
    ]
    return _json_error(422, error_body(422, message, details=details))


class MeshMiddleware:
    """Request id, trace context and a body limit for every HTTP request (pure ASGI).

    Pure ASGI rather than Starlette's BaseHTTPMiddleware: streaming responses (SSE)
    run in the request's own task, so the correlation id and the current span reach
    every call made while streaming.
    """

    def __init__(self, app: ASGIApp, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            request_id = _request_id(headers.get(REQUEST_ID_HEADER))
        except BadRequest as error:
            await _json_error(400, error_body(400, error.message))(scope, receive, send)
            return
        token = _correlation.set(request_id)
        try:
            if scope["method"] in _BODY_METHODS:
                body = await _read_body(receive, headers, self.max_body)
                if body is None:
                    message = f"request body larger than {self.max_body} bytes"
                    await _json_error(413, error_body(413, message))(scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self._guarded(scope, receive, send, headers, request_id)
        finally:
            _correlation.reset(token)

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, request_id: str
    ) -> None:
        """A bug in the app is logged with its traceback and answered with a JSON 500
        that carries the request id, never the traceback or an HTML page."""
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).setdefault(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self._traced(scope, receive, sender, headers)
        except Exception as error:
            _log.error("unhandled error in HTTP handler", path=scope.get("path"), exc_info=error)
            if started:
                raise  # too late for a response of our own: the server closes the connection
            body = error_body(500, "internal error (logged with this request_id)")
            await _json_error(500, body)(scope, receive, sender)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        """The request as a SERVER span, child of the caller's `traceparent` if any."""
        if not tracing.ENABLED:
            await self.app(scope, receive, send)
            return
        outer = _outer_server_span(scope)
        if outer is not None:  # the app traces HTTP itself (FastAPI's own telemetry, ...)
            token = otel_context.attach(trace.set_span_in_context(outer))
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
            return
        carrier = {k: headers[k] for k in (h.TRACEPARENT, h.TRACESTATE) if k in headers}
        parent = propagate.extract(carrier, context=otel_context.Context())
        method = scope["method"]
        span = _tracer.start_span(
            f"{method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        )
        status: list[int] = []

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        current = trace.set_span_in_context(span)
        if span.get_span_context().is_valid:
            scope = _with_trace_headers(scope, current)  # instrumentation inside nests under us
        token = otel_context.attach(current)
        try:
            await self.app(scope, receive, send_status)
        finally:
            otel_context.detach(token)
            _end_span(span, scope, status)


def _outer_server_span(scope: Scope) -> trace.Span | None:
    """A SERVER span of this request made by instrumentation outside us, if any: one
    span per request, so ours is left out rather than made a sibling of it."""
    span = getattr(scope.get("fastapi.telemetry"), "span", None)
    if isinstance(span, trace.Span) and span.get_span_context().is_valid:
        return span
    current = trace.get_current_span()
    context = current.get_span_context()
    return current if context.is_valid and not context.is_remote else None


def _with_trace_headers(scope: Scope, context: otel_context.Context) -> Scope:
    """The request as seen inside: its `traceparent` names our span, not the caller's."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    names = {name.encode() for name in carrier} | {b"traceparent", b"tracestate"}
    raw = [(k, v) for k, v in scope["headers"] if k.lower() not in names]
    raw += [(k.encode(), v.encode()) for k, v in carrier.items()]
    return {**scope, "headers": raw}


def _end_span(span: trace.Span, scope: Scope, status: list[int]) -> None:
    route = getattr(scope.get("route"), "path", None)
    if span.is_recording():
        span.update_name(f"{scope['method']} {route}" if route else scope["method"])
        if route:
            span.set_attribute("http.route", route)
        if status:
            span.set_attribute("http.response.status_code", status[0])
            if status[0] >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {status[0]}"))
    span.end()


def _request_id(value: str | None) -> str:
    if value is None or not value.strip():
        return h.new_id()
    return h.check_id(REQUEST_ID_HEADER, value.strip())


async def _read_body(receive: Receive, headers: Headers, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit` (not read further)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app sees an empty body and then the disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as servers do

    return replay


class MeshEdge:
    """One mesh client for an HTTP app, and the calls that carry the request's ids.

    `url` and `connect_options` go to `Client.open` (default: `NATS_URL` and the
    credentials of the environment); `name` is the client's connection name and the
    service name on its spans; `max_body` bounds request bodies (413 above it).
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        name: str = "http-edge",
        max_body: int = DEFAULT_MAX_BODY,
        **connect_options: Any,
    ) -> None:
        self.url = url
        self.name = name
        self.max_body = max_body
        self._options = connect_options
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The app's client; only while the lifespan runs."""
        if self._client is None:
            raise RuntimeError("the mesh client is open only while the app's lifespan runs")
        return self._client

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """`FastAPI(lifespan=edge.lifespan)`: connect on start-up, close on shutdown."""
        self._client = await Client.open(self.url, name=self.name, **self._options)
        try:
            yield
        finally:
            client, self._client = self._client, None
            await client.close()

    def install(self, app: Starlette) -> None:
        """Add the middleware and map errors to JSON responses with HTTP statuses."""
        app.add_middleware(MeshMiddleware, max_body=self.max_body)
        handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
            ServiceError: _service_error,
            PublishError: _publish_error,
            HTTPException: _http_error,
        }
        try:
            from fastapi.exceptions import RequestValidationError
        except ImportError:  # a Starlette app: no request validation to map
            pass
        else:
            handlers[RequestValidationError] = _validation_error
        for error_type, handler in handlers.items():
            app.add_exception_handler(error_type, handler)

    async def call(
        self,
        subject: str,
        payload: Any = None,
        *,
        returns: Any = Any,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """`client.call` with the HTTP request's correlation id (see `Client.call`)."""
        return await self.client.call(
            subject,
            payload,
            returns=returns,
            timeout=timeout,
            headers=headers,
            correlation_id=correlation_id(),
            idempotency_key=idempotency_key,
        )

    async def publish(
        self,
        event_type: str,
        event: Any,
        *,
        event_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PublishAck:
        """`client.publish` with the HTTP request's correlation id."""
        return await self.client.publish(
            event_type,
            event,
            event_id=event_id,
            headers=headers,
            correlation_id=correlation_id(),
            timeout=timeout,
        )

    async def enqueue(self, kind: str, payload: Any, **options: Any) -> JobHandle[Any]:
        """`client.enqueue` (a `JobHandle`), carrying the HTTP request's correlation id;
        `options` are those of `Client.enqueue` (`job_id`, `delay`, `priority`, ...)."""
        options.setdefault("correlation_id", correlation_id())
        return await self.client.enqueue(kind, payload, **options)

    def job(self, kind: str, job_id: str) -> JobHandle[Any]:
        """`client.job`: a handle to an existing job (`status()`, `watch()`, `cancel()`)."""
        return self.client.job(kind, job_id)

    def events(
        self,
        *event_types: str,
        where: Callable[[MeshEvent], bool] | None = None,
        until: Callable[[MeshEvent], bool] | None = None,
    ) -> EventWatch:
        """Events as they are published, filtered (see `framework.web.events.EventWatch`).

        Use it as `async with edge.events(...) as events:`, or hand it to `sse()`.
        """
        from .events import watch_events

        return watch_events(self.client, *event_types, where=where, until=until)
