"""The caller's side: typed request-reply, event publishing and discovery.

`connect()` is what scripts, web edges and tests use; services get the same `Client`
through their `Context`, which adds correlation, tracing and deadline propagation.
Every failure is a `framework.errors.MeshError`: the first connection is bounded
(`ConnectionFailed`), a closed client says so (`ClientClosed`), a reply's ADR-32
error comes back as the `ServiceError` subclass the handler raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Generator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError

from .errors import (
    AuthorizationFailed,
    ClientClosed,
    ConnectionFailed,
    DeadlineExceeded,
    NoResponders,
    NotFound,
    PermissionDenied,
    ServiceError,
)
from .events.batch import BatchPublisher
from .events.history import EventRecord, read_history
from .events.publish import publish_event
from .jobs import enqueue as _jobs
from .jobs import schedule as _schedules
from .jobs.handle import JobHandle
from .observability import tracing as telemetry
from .observability.logging import get_logger
from .rpc.discovery import InfoResponse, PingResponse, StatsResponse, gather
from .transport import headers as h
from .transport.codec import decode, encode_payload
from .transport.mux import Mux
from .transport.names import check_subject
from .transport.settings import DEFAULT_URL, ConnectSettings, redact_url
from .transport.wire import header_block
from .transport.wire_errors import (
    denied_subject,
    is_authorization_violation,
    mesh_error,
    service_error,
    service_of,
)

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Client", "Connecting", "connect"]

T = TypeVar("T")
R = TypeVar("R", PingResponse, InfoResponse, StatsResponse)
DEFAULT_TIMEOUT = 5.0
_log = get_logger("framework.client")
_service_of = service_of


def _answers_requests(endpoint: Mapping[str, Any]) -> bool:
    """An ADR-32 endpoint that is request-reply: ours say `kind: rpc`; others say nothing."""
    metadata = endpoint.get("metadata") or {}
    return bool(metadata.get("kind", "rpc") == "rpc")


def raise_for_error(msg_headers: Mapping[str, str] | None, subject: str) -> None:
    """Turn ADR-32 error headers back into the typed error the handler raised."""
    error = service_error(msg_headers, subject)
    if error is not None:
        raise error


class _Errors:
    """error_cb of a connection: routes permission violations to what waits on them.

    nats-py hands the server's -ERR 'Permissions Violation for Publish to "x"' only to
    error_cb; the publish or request that caused it would otherwise wait out its timeout.
    It hands it lowercased, so calls are kept by their subject lowercased (two subjects
    differing only in case, refused at the same moment, cannot be told apart).
    Until the first connection succeeds, failures are kept (`last`) for the error that
    `Client.open` raises, instead of being logged four times a second.
    """

    def __init__(self) -> None:
        self.auth_failed: asyncio.Event | None = None
        self.mux: Mux | None = None  # its requests fail at once when refused
        self.connecting = True
        self.last: Exception | None = None
        self.calls: dict[str, set[asyncio.Task[Any]]] = {}
        self._refusals: dict[asyncio.Task[Any], str] = {}

    def watch(self, subject: str) -> asyncio.Task[Any] | None:
        """Note the task calling `subject`, so a refusal can end its wait at once."""
        task = asyncio.current_task()
        if task is not None:
            self.calls.setdefault(subject.lower(), set()).add(task)
        return task

    def unwatch(self, subject: str, task: asyncio.Task[Any]) -> None:
        key = subject.lower()
        tasks = self.calls.get(key)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self.calls[key]
        self._refusals.pop(task, None)

    def refused(self, task: asyncio.Task[Any]) -> str | None:
        """The refusal that cancelled `task`, if that is why it was cancelled."""
        reason = self._refusals.pop(task, None)
        if reason is not None:
            task.uncancel()  # our cancel, not the caller's: it must not leak outwards
        return reason

    async def on_error(self, error: Exception) -> None:
        subject = denied_subject(error)
        if subject is not None:
            reason = f"not allowed to publish to {subject}: {error}"
            if self.mux is not None:
                self.mux.refuse(subject, reason)
            for task in self.calls.get(subject.lower(), ()):
                if task not in self._refusals:
                    self._refusals[task] = reason
                    task.cancel()
        elif self.auth_failed is not None and is_authorization_violation(error):
            self.auth_failed.set()
        if self.connecting:
            self.last = error
            return
        await _on_error(error)


def _connect_failed(settings: ConnectSettings, waited: float, cause: BaseException | None) -> str:
    """The message of `ConnectionFailed`: the URL tried, the cause, what to change."""
    tried = ", ".join(redact_url(u) for u in settings.servers)
    reason = (str(cause) or type(cause).__name__) if cause is not None else "no answer"
    configured = os.environ.get("NATS_URL")
    if not settings.url_from_env:
        source = "The URL was passed in (NATS_URL is read only when none is)"
    elif configured:
        source = f"The URL came from NATS_URL={redact_url(configured)}"
    else:
        source = f"NATS_URL is not set, so the default {DEFAULT_URL} was tried"
    return (
        f"cannot connect to NATS at {tried} within {waited:g}s: {reason}. Is a server "
        f"running there? {source}. Point elsewhere with NATS_URL (or the url argument); "
        "wait longer with NATS_CONNECT_TIMEOUT (or connect_timeout=)."
    )


class Client:
    """A connection to NATS with typed calls; cheap to share between tasks.

    Get one with `connect()` (or `Client.open`); a service's handlers reach theirs
    through `ctx.client`. Close it with `close()` or by leaving `async with`.
    """

    def __init__(self, nc: NATS, *, name: str | None = None, owns_connection: bool = True) -> None:
        """Wrap a connected nats-py client (`Client.open` makes both at once).

        Args:
            nc: an already connected nats-py client.
            name: shown to the server and as the producer of published events.
            owns_connection: close `nc` on `close()` (False: the caller closes it).
        """
        self._errors: _Errors | None = None
        self._nc = nc
        self.name = name
        self._owns = owns_connection
        self.default_timeout = DEFAULT_TIMEOUT
        self._js: Any = None
        self._mux = Mux(nc)

    @classmethod
    async def open(
        cls,
        url: str | Sequence[str] | None = None,
        *,
        name: str | None = None,
        connect_timeout: float | None = None,
        **options: Any,
    ) -> Client:
        """Connect, failing fast: `ConnectionFailed` if no server answers in time.

        Args:
            url: one URL, a comma-separated list or a sequence (a cluster); default
                `NATS_URL`, else `nats://127.0.0.1:4222`. Credentials and TLS come
                from the environment (`NATS_USER`, `NATS_CREDS`, `NATS_TLS_CA`, ...).
            name: the connection's name, shown by the server's monitoring.
            connect_timeout: seconds the *first* connection may take (default
                `NATS_CONNECT_TIMEOUT`, else 5). Reconnecting later is not bounded.
            **options: passed to nats-py's `connect` as they are (they win).

        Raises:
            ConnectionFailed: no server answered in time, or the URL is not a NATS URL.
            AuthorizationFailed: the server refused the credentials.
        """
        settings = ConnectSettings.from_env(url)
        bound = settings.connect_timeout if connect_timeout is None else connect_timeout
        errors = _Errors()
        errors.auth_failed = asyncio.Event()
        nc = NATS()
        h.install_header_parser(nc)
        await _first_connect(nc, settings, errors, bound, {"name": name or "framework", **options})
        errors.auth_failed = None
        errors.connecting = False
        client = cls(nc, name=name)
        client._errors = errors
        errors.mux = client._mux
        return client

    @property
    def nc(self) -> NATS:
        """The underlying nats-py connection, for anything the framework does not wrap."""
        return self._nc

    @property
    def js(self) -> Any:
        """nats-py's JetStream context on this connection (streams, KV, consumers)."""
        if self._js is None:
            self._js = self._nc.jetstream()
        return self._js

    @property
    def is_closed(self) -> bool:
        """True once `close()` ran (or the connection was closed for good)."""
        return bool(self._nc.is_closed)

    def check_open(self) -> None:
        """Raise `ClientClosed` if the client is closed: say so instead of nats-py's error."""
        if self._nc.is_closed:
            raise ClientClosed(
                f"the client{f' {self.name!r}' if self.name else ''} is closed; "
                "open a new one with `connect()`"
            )

    async def close(self) -> None:
        """Close the connection (if this client owns it); calls afterwards raise `ClientClosed`."""
        if self._owns and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

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

        Args:
            subject: `<service>.<endpoint>`, a literal subject (no wildcards).
            payload: anything msgspec encodes (a Struct, dict, str, ...) as JSON; bytes
                are sent as they are; None sends an empty body.
            returns: the type the reply is decoded into (`Any`: plain JSON; None:
                the body is ignored).
            timeout: seconds to wait (default `default_timeout`, 5). An explicit one,
                or one inherited from `parent`, is also sent as the `Deadline` header so
                the handler stops when the caller gives up; the default stays local.
            headers: extra headers to send.
            correlation_id: joins the call to a conversation (default: a new one).
            idempotency_key: an idempotent endpoint answers a repeated key with the
                reply it stored the first time.
            parent: the handler's context (what `ctx.call` passes): its correlation
                id, trace and remaining deadline carry over.

        Raises:
            ServiceError: the handler's error, rebuilt (`BadRequest`, `NotFound`,
                `DeadlineExceeded`, `RemoteError`, `NoResponders`, or any code), also
                403 (not permitted), 413 (too large) and 502 (undecodable reply).
            ClientClosed: the client is closed.
            InvalidName: `subject` is not a literal subject.
        """
        self.check_open()
        check_subject(subject)
        out, wait = self._call_headers(
            subject, timeout, headers, correlation_id, idempotency_key, parent
        )
        result: T = await self._traced_call(subject, payload, returns, wait, out, parent)
        return result

    def _call_headers(
        self,
        subject: str,
        timeout: float | None,
        headers: Mapping[str, str] | None,
        correlation_id: str | None,
        idempotency_key: str | None,
        parent: Context | None,
    ) -> tuple[dict[str, str] | None, float]:
        """The headers a call sends, and how long it waits.

        A Deadline header is sent only when a deadline exists: an explicit `timeout` or
        one inherited from `parent`. The default timeout stays local to this caller.
        """
        wait = self.default_timeout if timeout is None else timeout
        if parent is not None:
            remaining = parent.remaining()
            if remaining is not None:
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"deadline passed before calling {subject}", service=_service_of(subject)
                    )
                wait = timeout = min(wait, remaining)
        out = h.outgoing(  # the one place that decides what a call or an event carries
            headers,
            parent=parent,
            correlation_id=correlation_id,
            deadline=None if timeout is None else time.time() + wait,
            idempotency_key=idempotency_key,
        )
        return out, wait

    async def _traced_call(
        self,
        subject: str,
        payload: Any,
        returns: Any,
        wait: float,
        out: dict[str, str] | None,
        parent: Context | None,
    ) -> Any:
        """The request inside its CLIENT span, whose context travels in the headers."""
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
            return self._decode_reply(reply.data, returns, subject)
        except Exception as error:
            telemetry.record_error(span, error)
            raise
        finally:
            span.end()

    async def _request(
        self, subject: str, data: bytes, wait: float, out: dict[str, str] | None
    ) -> Any:
        block = header_block(out) if out else None
        size = len(data) + (len(block) if block is not None else 0)
        if size > self._nc.max_payload:
            raise ServiceError(
                413,
                f"request of {size} bytes (with headers) exceeds the server's "
                f"max_payload of {self._nc.max_payload}",
                service=_service_of(subject),
            )
        started = time.monotonic()
        for attempt in (1, 2):
            try:
                mux = self._mux if self._mux.ready_now else await self.mux()
                return await mux.request(subject, data, wait, block)  # refused: at once
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
            except NatsError as exc:
                raise mesh_error(exc, f"calling {subject}") from None
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

    async def history(
        self,
        type_or_domain: str,
        key: str,
        *,
        after: int = 0,
        limit: int = 10_000,
        timeout: float = 5.0,
    ) -> list[EventRecord]:
        """One key's events in stream order (event sourcing: fold them into state).

        `type_or_domain` is an event type (`order.created.v1`: that type's events of the
        key) or a domain (`order`: every type's). Only events published with
        `key=` are found; `after` skips sequences up to it; at most `limit` are returned.
        The last record's `sequence` is what `publish(...,
        expected_last_subject_sequence=)` expects next (0 when the list is empty).
        """
        return await read_history(
            self, type_or_domain, key, after=after, limit=limit, timeout=timeout
        )

    def batch(self, *, max_outstanding: int = 256, timeout: float = 10.0) -> BatchPublisher:
        """Publish many events without waiting for each ack (`async with client.batch() as b`).

        An event refused because its stream has no reachable leader (an election, a
        partition) is sent again with the same event id, as `publish` does, so a batch
        rides out an election; leaving the block waits for those retries too.

        Args:
            max_outstanding: events sent but not yet acknowledged (retried ones
                included), at most; a publish beyond it waits for a slot.
            timeout: seconds from an event's first send (retries included) before it
                counts as not stored.
        """
        self.check_open()
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
        """Every running service instance (or those of service `name`) that answers
        `$SRV.PING` within `timeout` seconds: an empty list when none does."""
        return await self._gather("PING", name, PingResponse, timeout)

    async def info(self, name: str | None = None, *, timeout: float = 0.5) -> list[InfoResponse]:
        """`$SRV.INFO` of every instance (or of service `name`): endpoints, subscribers
        and their schemas, collected for `timeout` seconds."""
        return await self._gather("INFO", name, InfoResponse, timeout)

    async def stats(self, name: str | None = None, *, timeout: float = 0.5) -> list[StatsResponse]:
        """`$SRV.STATS` of every instance (or of service `name`): requests, errors,
        processing times, consumer lag, collected for `timeout` seconds."""
        return await self._gather("STATS", name, StatsResponse, timeout)

    discover = ping

    async def _gather(
        self, verb: str, name: str | None, response_type: type[R], timeout: float
    ) -> list[R]:
        self.check_open()
        try:
            return await gather(self._nc, verb, name, response_type, timeout)
        except ConnectionClosedError:
            self.check_open()
            raise
        except NatsError as exc:
            raise mesh_error(exc, f"$SRV.{verb}") from None


async def _first_connect(
    nc: NATS,
    settings: ConnectSettings,
    errors: _Errors,
    bound: float,
    options: Mapping[str, Any],
) -> None:
    """nats-py's connect, bounded: it would retry a refused first connection forever."""
    assert errors.auth_failed is not None
    nats_options: dict[str, Any] = {
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "connect_timeout": min(2.0, bound),
        "error_cb": errors.on_error,
        "disconnected_cb": _on_disconnect,
        "reconnected_cb": _on_reconnect,
        "closed_cb": _on_closed,
        **settings.nats_options(),
        **options,
    }
    connecting = asyncio.ensure_future(nc.connect(**nats_options))
    refused = asyncio.ensure_future(errors.auth_failed.wait())
    try:
        await asyncio.wait(
            {connecting, refused}, timeout=bound, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refused.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
    if errors.auth_failed.is_set() or connecting.cancelled():
        await _abandon(nc)
        if errors.auth_failed.is_set():
            raise AuthorizationFailed(
                "nats: authorization violation: check NATS_USER/NATS_PASSWORD, NATS_TOKEN, "
                "NATS_NKEY_SEED(_FILE) or NATS_CREDS"
            )
        raise ConnectionFailed(_connect_failed(settings, bound, errors.last))
    error = connecting.exception()
    if error is not None:  # nats-py gave up itself (e.g. max_reconnect_attempts set)
        await _abandon(nc)
        if isinstance(error, NatsError | OSError | asyncio.TimeoutError):
            raise ConnectionFailed(_connect_failed(settings, bound, errors.last or error)) from None
        raise error


async def _abandon(nc: NATS) -> None:
    """Close a connection that never got established: bounded, as closing a transport
    cut off mid-handshake (TLS) can wait forever."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await nc.close()


class Connecting:
    """What `connect()` returns: `async with` it (closed on exit) or `await` it (yours
    to close)."""

    def __init__(self, url: str | Sequence[str] | None, name: str | None, options: Any) -> None:
        self._url = url
        self._name = name
        self._options = options
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return Client.open(self._url, name=self._name, **self._options).__await__()

    async def __aenter__(self) -> Client:
        self._client = await Client.open(self._url, name=self._name, **self._options)
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def connect(
    url: str | Sequence[str] | None = None,
    *,
    name: str | None = None,
    connect_timeout: float | None = None,
    **options: Any,
) -> Connecting:
    """Connect to NATS: `async with connect() as client:` closes it on exit;
    `client = await connect()` hands over an open client that you `close()`.

    Args:
        url: one URL, a comma-separated list or a sequence (a cluster); default
            `NATS_URL`, else `nats://127.0.0.1:4222`.
        name: the connection's name, shown by the server's monitoring.
        connect_timeout: seconds the first connection may take (default
            `NATS_CONNECT_TIMEOUT`, else 5); then `ConnectionFailed` names the URL,
            the cause and `NATS_URL`. Reconnecting later is not bounded.
        **options: passed to nats-py's `connect` as they are.
    """
    if connect_timeout is not None:
        options["connect_timeout"] = connect_timeout
    return Connecting(url, name, options)


async def _on_error(error: Exception) -> None:
    _log.warning("nats connection error", error=str(error) or type(error).__name__)


async def _on_disconnect() -> None:
    # nats-py reports a deliberate close as a disconnect too; only a lost link is news.
    _log.debug("disconnected from nats")


async def _on_closed() -> None:
    _log.debug("nats connection closed")


async def _on_reconnect() -> None:
    _log.info("reconnected to nats")
