"""Request-reply endpoints: decode, run the handler, encode, answer (ADR-32 errors)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.abc import TaskGroup

from ..context import Context
from ..errors import BadRequest, DeadlineExceeded, ServiceError
from ..observability import metrics
from ..observability import tracing as telemetry
from ..observability.logging import get_logger
from ..transport import headers as h
from ..transport import wire
from ..transport.codec import DECODE_ERRORS, decoder_for, encode, schema_json
from ..transport.dispatch import WorkerPool
from ..transport.signature import NO_PAYLOAD, Handler, HandlerSignature
from ..transport.timers import Deadlines
from ..transport.wire import header_block
from ..types import Msg

if TYPE_CHECKING:
    from ..client import Client
    from ..events.idempotency import ResponseCache

__all__ = ["RpcEndpoint", "read_request_headers"]

_log = get_logger("framework.rpc.endpoint")


class RequestHeaders(msgspec.Struct):
    """What the framework reads from an incoming request's headers, validated."""

    correlation_id: str | None = None
    causation_id: str | None = None
    deadline: float | None = None
    idempotency_key: str | None = None


_NO_HEADERS = RequestHeaders()


def read_request_headers(headers: Mapping[str, str] | None) -> RequestHeaders:
    """Bounded, control-free values; ids in a safe alphabet; deadline parsed."""
    if not headers:
        return _NO_HEADERS
    h.check_headers(headers)
    correlation_id = headers.get(h.CORRELATION_ID) or None
    causation_id = headers.get(h.CAUSATION_ID) or None
    key = headers.get(h.IDEMPOTENCY_KEY) or None
    deadline = headers.get(h.DEADLINE)
    return RequestHeaders(
        correlation_id=h.check_id(h.CORRELATION_ID, correlation_id) if correlation_id else None,
        causation_id=h.check_id(h.CAUSATION_ID, causation_id) if causation_id else None,
        deadline=h.parse_deadline(deadline) if deadline else None,
        idempotency_key=h.check_id(h.IDEMPOTENCY_KEY, key) if key else None,
    )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


def error_headers(error: ServiceError) -> dict[str, str]:
    message = error.message.replace("\r", " ").replace("\n", " ")[: h.MAX_HEADER_VALUE]
    return {h.ERROR: message, h.ERROR_CODE: str(error.code)}


class _Watch:
    """A handler's task watched for its caller's deadline; `fired` once cancelled for it."""

    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False


def _cancel(watch: _Watch) -> None:
    watch.fired = True
    watch.task.cancel()


class RpcEndpoint:
    """One `<service>.<endpoint>` subject served by a bounded pool of workers."""

    kind = "rpc"

    def __init__(
        self,
        service: str,
        name: str,
        fn: Handler,
        signature: HandlerSignature,
        *,
        subject: str,
        max_concurrency: int,
        idempotent: bool,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.service = service
        self.name = name
        self.fn = fn
        self.signature = signature
        self.subject = subject
        self.queue_group = service
        self.max_concurrency = max_concurrency
        self.idempotent = idempotent
        self.extra_metadata = dict(metadata or {})
        self.stats = metrics.stats_for(service, name, "rpc")
        self._span_name = f"process {subject}"
        self._span_attributes = telemetry.handler_attributes(service, subject, self.queue_group)
        self._client: Client | None = None
        self._pool: WorkerPool | None = None
        self._sub: Any = None
        self._cache: ResponseCache | None = None
        self._deadlines = Deadlines(_cancel)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = (
            decoder_for(signature.payload_type)
            if signature.payload_type is not NO_PAYLOAD
            else None
        )

    def metadata(self) -> dict[str, str]:
        meta = {"kind": "rpc", "max_concurrency": str(self.max_concurrency)}
        if self.signature.payload_type is not NO_PAYLOAD:
            meta["request_schema"] = schema_json(self.signature.payload_type)
        meta["response_schema"] = schema_json(self.signature.returns)
        if self.idempotent:
            meta["idempotent"] = "true"
        meta.update(self.extra_metadata)
        return meta

    def extra_stats(self) -> dict[str, Any] | None:
        return {"in_flight": self.stats.in_flight}

    async def prepare(self, client: Client) -> None:
        """Everything that can fail on configuration, before any task starts."""
        self._client = client
        self.stats.reset()  # a service served again starts its counts afresh
        if self.idempotent:
            from ..events.idempotency import ResponseCache

            self._cache = await ResponseCache.open(client, self.service, self.name)

    async def start(self, client: Client, task_group: TaskGroup) -> None:
        # this serve's loop (an endpoint can be served again, on another loop)
        self._loop = asyncio.get_running_loop()
        self._deadlines = Deadlines(_cancel)
        self._pool = WorkerPool(self._handle, self.max_concurrency)
        self._pool.start(task_group)
        self._sub = await client.nc.subscribe(
            self.subject, queue=self.queue_group, cb=self._pool.submit
        )
        metrics.track(self)

    async def stop(self, grace: float) -> bool:
        """Stop taking requests, answer the ones already received, then release workers."""
        metrics.untrack(self)
        deadline = time.monotonic() + grace
        if self._sub is not None:
            with anyio.move_on_after(grace):
                await self._sub.drain()
        if self._pool is None:
            return True
        return await self._pool.close(max(0.0, deadline - time.monotonic()))

    async def _handle(self, msg: Msg) -> None:
        started = time.perf_counter_ns()
        self.stats.in_flight += 1
        error: str | None = None
        try:
            body, reply_headers = await self._process(msg)
        except ServiceError as exc:
            body, reply_headers, error = b"", error_headers(exc), exc.message
        except Exception as exc:  # a framework bug must still answer, and be seen
            failure = self._internal_error(exc, None)
            body, reply_headers, error = b"", error_headers(failure), failure.message
        finally:
            self.stats.in_flight -= 1
        self.stats.record(time.perf_counter_ns() - started, error)
        if msg.reply:
            await self._reply(msg.reply, body, reply_headers)

    async def _reply(self, reply: str, body: bytes, headers: dict[str, str] | None) -> None:
        nc = self._client.nc  # type: ignore[union-attr]
        block = header_block(headers) if headers else None
        if len(body) + (len(block) if block is not None else 0) > nc.max_payload:
            limit = nc.max_payload
            failure = ServiceError(
                500, f"reply of {len(body)} bytes exceeds the server's max_payload of {limit}"
            )
            _log.error("reply too large", subject=self.subject, size=len(body), limit=limit)
            body, block = b"", header_block(error_headers(failure))
        try:
            await wire.publish(nc, reply, body, "", block)  # the server's inbox: a valid subject
        except Exception as exc:  # a lost connection must not kill the worker
            _log.warning("reply failed", subject=self.subject, error=str(exc))

    async def _process(self, msg: Msg) -> tuple[bytes, dict[str, str] | None]:
        """The SERVER span covers the whole answer and is current while the handler runs."""
        span = telemetry.start_handler_span(
            self._span_name, telemetry.SpanKind.SERVER, self._span_attributes, msg.headers
        )
        token = telemetry.activate(span)
        correlation_id: str | None = None
        try:
            request = read_request_headers(msg.headers)
            correlation_id = request.correlation_id
            if correlation_id is None and self.signature.wants_context:
                correlation_id = h.new_id()  # the edge: every later hop carries this one
            if correlation_id is not None and span.is_recording():
                span.set_attribute(telemetry.CONVERSATION_ID, correlation_id)
            return await self._answer(msg, request, span, correlation_id)
        except ServiceError as exc:
            # a caller's mistake (4xx) marks the caller's span, not this one (as in HTTP)
            telemetry.record_error(span, exc, status=exc.code >= 500)
            raise
        except Exception as exc:
            telemetry.record_error(span, exc)
            raise self._internal_error(exc, correlation_id) from None
        finally:
            telemetry.deactivate(token)
            span.end()

    async def _answer(
        self, msg: Msg, request: RequestHeaders, span: Any, correlation_id: str | None
    ) -> tuple[bytes, dict[str, str] | None]:
        if request.deadline is not None and request.deadline <= time.time():
            raise DeadlineExceeded("deadline passed before the request was handled")
        payload = self._decode(msg.data)
        if self._cache is not None and request.idempotency_key:
            cached = await self._cache.get(request.idempotency_key)
            if cached is not None:
                return cached, None
        ctx = (
            self._context(msg, request, span, correlation_id)
            if self.signature.wants_context
            else None
        )
        result = await self._run(payload, ctx, request.deadline)
        body = encode(result)
        if self._cache is not None and request.idempotency_key:
            await self._cache.put(request.idempotency_key, body)
        return body, None

    def _decode(self, data: bytes) -> Any:
        if self._decoder is None:
            return None
        if not data:
            raise BadRequest(
                f"empty request: expected JSON for {_type_name(self.signature.payload_type)}"
            )
        try:
            return self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid request: {exc}") from None
        except DECODE_ERRORS as exc:  # not valid JSON at all (validation was caught above)
            raise BadRequest(f"undecodable request: {exc}") from None

    async def _run(self, payload: Any, ctx: Context | None, deadline: float | None) -> Any:
        if deadline is None:
            return await self.signature.invoke(self.fn, payload, ctx)
        # One timer for the endpoint's deadlines, not asyncio.timeout's per request (5 us,
        # measured; an anyio scope costs three times that). It cancels the handler's task
        # as asyncio.timeout would, and only its own cancellation becomes a 408.
        loop = self._loop  # asyncio's own lookup of the loop asks the kernel for the pid
        task = asyncio.current_task(loop) if loop is not None else asyncio.current_task()
        assert task is not None
        watch = _Watch(task)
        key = self._deadlines.add(deadline - time.time(), watch)
        try:
            return await self.signature.invoke(self.fn, payload, ctx)
        except asyncio.CancelledError:
            if watch.fired:
                watch.fired = False
                if task.uncancel() == 0:  # ours alone, not also a cancel from outside
                    raise DeadlineExceeded(
                        "deadline passed while the request was handled"
                    ) from None
            raise
        finally:
            self._deadlines.done(key)
            if watch.fired:  # cancelled, but the handler swallowed it: undo ours
                task.uncancel()

    def _context(
        self, msg: Msg, request: RequestHeaders, span: Any, correlation_id: str | None
    ) -> Context:
        assert self._client is not None
        return Context(
            self._client,
            service=self.service,
            handler=self.name,
            subject=self.subject,
            correlation_id=correlation_id or h.new_id(),
            causation_id=request.causation_id,
            deadline=request.deadline,
            headers=msg.headers,
            span=span,
        )

    def _internal_error(self, exc: Exception, correlation_id: str | None) -> ServiceError:
        """Log the traceback here (the span is current: trace ids join the line);
        the caller gets only an id to quote."""
        error_id = h.new_id()
        _log.error(
            "handler failed",
            service=self.service,
            handler=self.name,
            subject=self.subject,
            correlation_id=correlation_id,
            error_id=error_id,
            exc_info=exc,
        )
        return ServiceError(
            500, f"internal error in {self.service}.{self.name} (error id {error_id})"
        )
