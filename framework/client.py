"""The caller's side: typed request-reply, event publishing and discovery.

`connect()` is what scripts, web edges and tests use; services get the same `Client`
through their `Context`, which adds correlation, tracing and deadline propagation.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from .errors import (
    DeadlineExceeded,
    NoResponders,
    NotFound,
    PermissionDenied,
    ServiceError,
    error_from_code,
)
from .events.publish import BatchPublisher, publish_event
from .jobs import enqueue as _jobs
from .jobs import schedule as _schedules
from .jobs.handle import JobHandle
from .observability import tracing as telemetry
from .rpc.discovery import InfoResponse, PingResponse, StatsResponse, gather
from .transport import headers as h
from .transport.codec import decode, encode_payload
from .transport.headers import wire_size
from .transport.mux import Mux
from .transport.names import check_subject
from .transport.settings import ConnectSettings

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Client", "connect"]

T = TypeVar("T")
DEFAULT_TIMEOUT = 5.0
_log = structlog.get_logger("framework.client")


def _service_of(subject: str) -> str:
    return subject.split(".", 1)[0]


def _answers_requests(endpoint: Mapping[str, Any]) -> bool:
    """An ADR-32 endpoint that is request-reply: ours say `kind: rpc`; others say nothing."""
    metadata = endpoint.get("metadata") or {}
    return bool(metadata.get("kind", "rpc") == "rpc")


def raise_for_error(msg_headers: Mapping[str, str] | None, subject: str) -> None:
    """Turn ADR-32 error headers back into the typed error the handler raised."""
    if not msg_headers:
        return
    code = msg_headers.get(h.ERROR_CODE)
    if code is None:
        return
    try:
        status = int(code)
    except ValueError:
        status = 500
    message = msg_headers.get(h.ERROR, "")
    raise error_from_code(status, message, service=_service_of(subject))


_DENIED = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


class _Errors:
    """error_cb of a connection: routes permission violations to what waits on them.

    nats-py hands the server's -ERR 'Permissions Violation for Publish to "x"' only to
    error_cb; the publish or request that caused it would otherwise wait out its timeout.
    """

    def __init__(self) -> None:
        self.auth_failed: asyncio.Event | None = None
        self.calls: dict[str, set[asyncio.Task[Any]]] = {}
        self._refusals: dict[asyncio.Task[Any], str] = {}

    def watch(self, subject: str) -> asyncio.Task[Any] | None:
        """Note the task calling `subject`, so a refusal can end its wait at once."""
        task = asyncio.current_task()
        if task is not None:
            self.calls.setdefault(subject, set()).add(task)
        return task

    def unwatch(self, subject: str, task: asyncio.Task[Any]) -> None:
        tasks = self.calls.get(subject)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self.calls[subject]
        self._refusals.pop(task, None)

    def refused(self, task: asyncio.Task[Any]) -> str | None:
        """The refusal that cancelled `task`, if that is why it was cancelled."""
        reason = self._refusals.pop(task, None)
        if reason is not None:
            task.uncancel()  # our cancel, not the caller's: it must not leak outwards
        return reason

    async def on_error(self, error: Exception) -> None:
        text = str(error)
        match = _DENIED.search(text)
        if match:
            for task in self.calls.get(match.group(1), ()):
                if task not in self._refusals:
                    self._refusals[task] = f"not allowed to publish to {match.group(1)}: {text}"
                    task.cancel()
        elif self.auth_failed is not None and "authorization violation" in text.lower():
            self.auth_failed.set()
        await _on_error(error)


class Client:
    """A connection to NATS with typed calls; cheap to share between tasks."""

    def __init__(self, nc: NATS, *, name: str | None = None, owns_connection: bool = True) -> None:
        self._errors: _Errors | None = None
        self._nc = nc
        self.name = name
        self._owns = owns_connection
        self.default_timeout = DEFAULT_TIMEOUT
        self._js: Any = None
        self._mux = Mux(nc)

    @classmethod
    async def open(
        cls, url: str | Sequence[str] | None = None, *, name: str | None = None, **options: Any
    ) -> Client:
        settings = ConnectSettings.from_env(url)
        errors = _Errors()
        errors.auth_failed = asyncio.Event()
        nats_options: dict[str, Any] = {
            "name": name or "framework",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "connect_timeout": 2,
            "error_cb": errors.on_error,
            "disconnected_cb": _on_disconnect,
            "reconnected_cb": _on_reconnect,
            "closed_cb": _on_closed,
            **settings.nats_options(),
            **options,
        }
        # H. A wrong password is not a server still starting: fail instead of retrying forever.
        nc = NATS()
        if hasattr(nc, "_parse_header_lines"):  # the same parse, at less than half the cost
            nc._parse_header_lines = h.parse_header_block  # type: ignore[method-assign]
        connecting = asyncio.ensure_future(nc.connect(**nats_options))
        refused = asyncio.ensure_future(errors.auth_failed.wait())
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
        refused.cancel()
        if not connecting.done():
            connecting.cancel()
            await nc.close()
            raise ConnectionRefusedError(
                "nats: authorization violation: check NATS_USER/NATS_PASSWORD, NATS_TOKEN, "
                "NATS_NKEY_SEED(_FILE) or NATS_CREDS"
            )
        connecting.result()
        errors.auth_failed = None
        client = cls(nc, name=name)
        client._errors = errors
        return client

    @property
    def nc(self) -> NATS:
        """The underlying nats-py connection, for anything the framework does not wrap."""
        return self._nc

    @property
    def js(self) -> Any:
        if self._js is None:
            self._js = self._nc.jetstream()
        return self._js

    async def close(self) -> None:
        if self._owns and not self._nc.is_closed:
            await self._nc.close()

    @overload
    async def call(
        self,
        subject: str,
        payload: Any = None,
        *,
        returns: type[T],
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        parent: Context | None = None,
    ) -> T: ...

    @overload
    async def call(
        self,
        subject: str,
        payload: Any = None,
        *,
        returns: Any = Any,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        parent: Context | None = None,
    ) -> Any: ...

    async def call(
        self,
        subject: str,
        payload: Any = None,
        *,
        returns: type[T] | Any = Any,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        parent: Context | None = None,
    ) -> T:
        """Request-reply with a typed result, or a typed `ServiceError`, never a silent hang.

        A Deadline header is sent only when a deadline exists: an explicit `timeout` or
        one inherited from `parent`. The default timeout stays local to this caller.
        """
        check_subject(subject)
        wait = self.default_timeout if timeout is None else timeout
        out: dict[str, str] | None = dict(headers) if headers else None
        send_deadline = timeout is not None
        if parent is not None:
            out = out or {}
            out[h.CORRELATION_ID] = parent.correlation_id
            if parent.message_id:
                out[h.CAUSATION_ID] = parent.message_id
            remaining = parent.remaining()
            if remaining is not None:
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"deadline passed before calling {subject}", service=_service_of(subject)
                    )
                wait = min(wait, remaining)
                send_deadline = True
        elif correlation_id:
            out = out or {}
            out[h.CORRELATION_ID] = h.check_id(h.CORRELATION_ID, correlation_id)
        if idempotency_key:
            out = out or {}
            out[h.IDEMPOTENCY_KEY] = h.check_id(h.IDEMPOTENCY_KEY, idempotency_key)
        if send_deadline:
            out = out or {}
            out[h.DEADLINE] = str(int((time.time() + wait) * 1000))
        span = telemetry.start_send_span(
            "request",
            subject,
            parent.service if parent is not None else self.name,
            telemetry.SpanKind.CLIENT,
            parent.span if parent is not None else None,
        )
        try:
            if span.get_span_context().is_valid:
                out = out or {}
                telemetry.inject_context(out, span)
                if span.is_recording() and out.get(h.CORRELATION_ID):
                    span.set_attribute(telemetry.CONVERSATION_ID, out[h.CORRELATION_ID])
            reply = await self._request(subject, encode_payload(payload), wait, out)
            raise_for_error(reply.headers, subject)
            result: T = self._decode_reply(reply.data, returns, subject)
            return result
        except Exception as error:
            telemetry.record_error(span, error)
            raise
        finally:
            span.end()

    async def _request(
        self, subject: str, data: bytes, wait: float, out: dict[str, str] | None
    ) -> Any:
        if wire_size(data, out) > self._nc.max_payload:
            raise ServiceError(
                413,
                f"request of {wire_size(data, out)} bytes (with headers) exceeds the server's "
                f"max_payload of {self._nc.max_payload}",
                service=_service_of(subject),
            )
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                mux = self._mux if self._mux.ready_now else await self.mux()
                return await self.refusable(subject, mux.request(subject, data, wait, out))
            except PermissionDenied as exc:
                raise ServiceError(403, str(exc), service=_service_of(subject)) from None
            except NoRespondersError:
                error, listed = await self._unserved(subject)
                wait -= time.monotonic() - started
                if not listed or attempt == 2 or wait <= 0.05:
                    raise error from None
                # a replica that lists the endpoint is just (re)subscribing: ask once more
                await anyio.sleep(0.02)
            except NatsTimeoutError:
                raise DeadlineExceeded(
                    f"no reply from {subject} within {wait:.3g}s", service=_service_of(subject)
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def mux(self) -> Mux:
        """The connection's one inbox subscription for requests (calls, direct gets)."""
        await self._mux.ready()
        return self._mux

    async def refusable(self, subject: str, operation: Awaitable[T]) -> T:
        """Await a publish or request to `subject`, ended at once if the server refuses it.

        nats-py reports a permissions violation only to the error callback; the waiting
        task is noted here (a set entry, no task per call) so the callback can end its
        wait with `PermissionDenied` instead of a timeout.
        """
        errors = self._errors
        task = errors.watch(subject) if errors is not None else None
        try:
            return await operation
        except asyncio.CancelledError:
            denial = errors.refused(task) if errors is not None and task is not None else None
            if denial is None:
                raise
            raise PermissionDenied(denial) from None
        finally:
            if errors is not None and task is not None:
                errors.unwatch(subject, task)

    async def _unserved(self, subject: str) -> tuple[ServiceError, bool]:
        """No responders: 404 if the service runs but lacks the endpoint, else 503.

        One `$SRV.INFO` round trip, paid only on this failure path, instead of a
        catch-all subscription that would double every request's traffic. Also says
        whether the service lists the endpoint after all (a replica starting up).
        """
        service = _service_of(subject)
        try:
            mux = await self.mux()
            reply = await mux.request(f"$SRV.INFO.{service}", b"", 0.25)
            listed = msgspec.json.decode(reply.data)["endpoints"]
            endpoints = [e.get("subject") for e in listed]
            # only what answers requests: a subscriber's subject takes events, not calls
            answering = [e.get("subject") for e in listed if _answers_requests(e)]
        except Exception:
            return NoResponders(f"no responders: nothing serves {subject}", service=service), False
        known = ", ".join(str(e) for e in answering if e) or "none"
        error = NotFound(
            f"{service} has no endpoint {subject} (it serves: {known})", service=service
        )
        return error, subject in endpoints

    @staticmethod
    def _decode_reply(data: bytes, returns: Any, subject: str) -> Any:
        try:
            if returns is Any:
                return msgspec.json.decode(data) if data else None
            if returns is None:
                return None
            return decode(data, returns)
        except msgspec.MsgspecError as error:
            raise ServiceError(
                502, f"invalid reply from {subject}: {error}", service=_service_of(subject)
            ) from None

    # Publishing lives with the events it makes; as a method it reads `client.publish(...)`.
    publish = publish_event

    def batch(self, *, max_outstanding: int = 256, timeout: float = 10.0) -> BatchPublisher:
        """Publish many events without waiting for each ack (`async with client.batch() as b`)."""
        return BatchPublisher(self, max_outstanding=max_outstanding, timeout=timeout)

    # Background jobs live in `framework.jobs`; these are their doors on the client.

    async def enqueue(
        self,
        kind: str,
        payload: Any = None,
        *,
        job_id: str | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        priority: str = "normal",
        returns: Any = Any,
        correlation_id: str | None = None,
        parent: Context | None = None,
    ) -> JobHandle[Any]:
        """Enqueue a job of `kind` (`<service>.<name>`) and return its `JobHandle` at once.

        `job_id` makes the job unique: while a job of that id is not finished, enqueueing
        it again returns the existing job. `delay` (seconds) or `at` (an aware datetime)
        hold it until then (a server message schedule). `priority`: "high", "normal" or
        "low". `returns`: the type `handle.result()` decodes the result to. A payload the
        kind's workers declared a schema for is validated here (`BadRequest`).
        """
        return await _jobs.enqueue(
            self,
            kind,
            payload,
            job_id=job_id,
            delay=delay,
            at=at,
            priority=priority,
            returns=returns,
            correlation_id=correlation_id,
            parent=parent,
        )

    def job(self, kind: str, job_id: str, *, returns: Any = Any) -> JobHandle[Any]:
        """A handle to an existing job (no I/O until it is used)."""
        return JobHandle(self, kind, job_id, returns)

    async def schedule(
        self,
        kind: str,
        payload: Any = None,
        *,
        cron: str | None = None,
        every: float | str | None = None,
        name: str | None = None,
        priority: str = "normal",
        time_zone: str | None = None,
    ) -> str:
        """Enqueue a job of `kind` on a recurring schedule kept by the server; returns its
        name (`name`, or a new one). `cron`: "0 0 * * * *" (seconds first; 5 fields get
        second 0) or "@hourly"/"@daily"/...; `every`: seconds or a duration like "1h".
        The same name replaces the schedule; `unschedule` ends it."""
        return await _schedules.schedule(
            self,
            kind,
            payload,
            cron=cron,
            every=every,
            name=name,
            priority=priority,
            time_zone=time_zone,
        )

    async def unschedule(self, kind: str, name: str) -> bool:
        """End a recurring schedule; False when there was none of that name."""
        return await _schedules.unschedule(self, kind, name)

    async def ping(self, name: str | None = None, *, timeout: float = 0.5) -> list[PingResponse]:
        return await gather(self._nc, "PING", name, PingResponse, timeout)

    async def info(self, name: str | None = None, *, timeout: float = 0.5) -> list[InfoResponse]:
        return await gather(self._nc, "INFO", name, InfoResponse, timeout)

    async def stats(self, name: str | None = None, *, timeout: float = 0.5) -> list[StatsResponse]:
        return await gather(self._nc, "STATS", name, StatsResponse, timeout)

    discover = ping


@asynccontextmanager
async def connect(
    url: str | Sequence[str] | None = None, *, name: str | None = None, **options: Any
) -> AsyncIterator[Client]:
    """Connect to NATS (URL from `NATS_URL` by default) and close on exit."""
    client = await Client.open(url, name=name, **options)
    try:
        yield client
    finally:
        await client.close()


async def _on_error(error: Exception) -> None:
    _log.warning("nats connection error", error=str(error) or type(error).__name__)


async def _on_disconnect() -> None:
    # nats-py reports a deliberate close as a disconnect too; only a lost link is news.
    _log.debug("disconnected from nats")


async def _on_closed() -> None:
    _log.debug("nats connection closed")


async def _on_reconnect() -> None:
    _log.info("reconnected to nats")
