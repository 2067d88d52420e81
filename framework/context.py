"""What a handler knows about the message it handles, and how it talks onward.

`ctx.call` and `ctx.publish` carry the correlation id, the trace and the remaining
deadline forward, so a chain of services needs no plumbing in user code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

import structlog
from opentelemetry import trace

if TYPE_CHECKING:
    from .client import Client
    from .events.history import EventRecord

__all__ = ["Context"]

T = TypeVar("T")
_EMPTY: Mapping[str, str] = {}


class Context:
    """Per-message state; built only for handlers that ask for it (a parameter typed
    `Context`).

    Attributes:
        service: the name of the service handling the message.
        handler: the endpoint or subscriber name.
        subject: the subject the message arrived on.
        correlation_id: the conversation's id: arrived in `Correlation-Id`, or new at
            the edge; every `ctx.call`/`ctx.publish` carries it on.
        causation_id: the id of the message that caused this one, if it said.
        event_id: the event's id (`Nats-Msg-Id`) for events; None for requests.
        attempt: the delivery attempt, from 1 (events are redelivered on failure).
        deadline: the caller's deadline in epoch seconds, or None (see `remaining()`).
        headers: the message's headers as they arrived (read-only).
        span: the handler's OpenTelemetry span (invalid without an SDK).
        log: a structlog logger bound with all of the above and the trace ids.
        client: the service's `Client`, for anything not tied to this message.
    """

    __slots__ = (
        "_client",
        "_log",
        "attempt",
        "causation_id",
        "correlation_id",
        "deadline",
        "event_id",
        "handler",
        "headers",
        "service",
        "span",
        "subject",
    )

    def __init__(
        self,
        client: Client,
        *,
        service: str,
        handler: str,
        subject: str,
        correlation_id: str,
        causation_id: str | None = None,
        event_id: str | None = None,
        attempt: int = 1,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
        span: trace.Span = trace.INVALID_SPAN,
    ) -> None:
        self._client = client
        self._log: Any = None
        self.service = service
        self.handler = handler
        self.subject = subject
        self.correlation_id = correlation_id
        self.causation_id = causation_id
        self.event_id = event_id
        self.attempt = attempt
        self.deadline = deadline  # absolute, epoch seconds
        self.headers = headers if headers is not None else _EMPTY
        self.span = span

    @property
    def client(self) -> Client:
        """The service's connection (calls from it do not carry this context)."""
        return self._client

    @property
    def log(self) -> Any:
        """Bound lazily: most messages never log, so they never pay for binding."""
        if self._log is None:
            fields: dict[str, Any] = {
                "service": self.service,
                "handler": self.handler,
                "subject": self.subject,
                "correlation_id": self.correlation_id,
                "attempt": self.attempt,
            }
            if self.event_id:
                fields["event_id"] = self.event_id
            span_context = self.span.get_span_context()
            if span_context.is_valid:
                fields["trace_id"] = format(span_context.trace_id, "032x")
                fields["span_id"] = format(span_context.span_id, "016x")
            self._log = structlog.get_logger("framework").bind(**fields)
        return self._log

    def remaining(self) -> float | None:
        """Seconds left until the caller's deadline, or None when there is none."""
        if self.deadline is None:
            return None
        return self.deadline - time.time()

    @property
    def message_id(self) -> str | None:
        """What a message sent from here names as its cause."""
        return self.event_id

    @overload
    async def call(
        self,
        subject: str,
        payload: Any = None,
        *,
        returns: type[T],
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
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
    ) -> Any: ...

    async def call(
        self,
        subject: str,
        payload: Any = None,
        *,
        returns: type[T] | Any = Any,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """`Client.call` as part of this message's conversation: the correlation id,
        the trace and the remaining deadline (the wait is capped by it) carry over.

        Args:
            subject: `<service>.<endpoint>`.
            payload: the request (msgspec-encodable, bytes, or None).
            returns: the reply's type (`Any`: plain JSON).
            timeout: seconds to wait, at most what is left of the deadline.
            headers: extra headers to send.
        """
        return await self._client.call(
            subject, payload, returns=returns, timeout=timeout, headers=headers, parent=self
        )

    async def publish(
        self,
        event_type: str,
        event: Any,
        *,
        event_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        key: str | None = None,
        expected_last_subject_sequence: int | None = None,
    ) -> Any:
        """`Client.publish` as part of this conversation: the correlation id, the trace
        and this message as the cause (`Causation-Id`) carry over; returns the `PublishAck`.

        Args:
            event_type: `[domain.]entity.action.vN`, e.g. `payment.captured.v1`.
            event: the payload (msgspec-encodable).
            event_id: the event's id (default: a new one); the same id is stored once.
            headers: extra headers to send.
            key: the entity's id, put into the subject (`events.<type>.<key>`).
            expected_last_subject_sequence: store only if the key's last event has this
                stream sequence (0: none yet); else `ConcurrencyConflict`.
        """
        return await self._client.publish(
            event_type,
            event,
            event_id=event_id,
            headers=headers,
            parent=self,
            key=key,
            expected_last_subject_sequence=expected_last_subject_sequence,
        )

    async def history(
        self, type_or_domain: str, key: str, *, after: int = 0, limit: int = 10_000
    ) -> list[EventRecord]:
        """`Client.history`: one key's events in stream order.

        Args:
            type_or_domain: an event type (that type's events) or a domain (all its types).
            key: the entity's id the events were published with.
            after: only events with a higher stream sequence.
            limit: at most this many.
        """
        return await self._client.history(type_or_domain, key, after=after, limit=limit)
