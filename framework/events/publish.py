"""Domain events on JetStream, the producing side: one event, published with an ack.

A publish returns once JetStream has stored the event; its id is the `Nats-Msg-Id`, so
a publish retried with the same id is stored once. It is sent again (same id) while its
stream has no reachable leader, by one rule (`retryable`) that the batches of
`events.batch` follow too, within a timeout. Building an event, its producer span and
the size check are shared with them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError

from ..errors import PublishError, StreamUnavailable
from ..observability import tracing as telemetry
from ..transport import headers as h
from ..transport.codec import encode_payload
from ..transport.names import check_event_key, check_event_type, event_subject, guard_subject
from ..transport.wire_errors import PubAck, api_error, publish_error
from ..transport.wire_errors import decode_pub_ack as _decode_pub_ack

if TYPE_CHECKING:
    from ..client import Client
    from ..context import Context

__all__ = [
    "NO_ACK",
    "PublishAck",
    "build_event",
    "check_size",
    "end_span",
    "is_clustered",
    "producer_span",
    "publish_error",
    "publish_event",
    "retryable",
]


class PublishAck(msgspec.Struct, frozen=True):
    """Where JetStream stored an event: `stream` and `seq`; `duplicate` when the event
    id was stored before (within the duplicate window) and this publish added nothing."""

    stream: str
    seq: int
    event_id: str
    duplicate: bool = False


_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def rfc3339_millis(now: float) -> str:
    """`2026-11-22T10:37:05.123Z` for an epoch time; the date and time part is formatted
    once a second (a `datetime` round trip per event cost 2 us)."""
    global _second
    fraction, integral = math.modf(now)  # rounded as datetime.fromtimestamp rounds
    whole, micros = int(integral), round(fraction * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{micros // 1000:03d}Z"


def _now_rfc3339() -> str:
    return rfc3339_millis(time.time())


def build_event(
    client: Client,
    event_type: str,
    event: Any,
    event_id: str | None,
    headers: Mapping[str, str] | None,
    correlation_id: str | None,
    parent: Context | None,
    key: str | None = None,
) -> tuple[str, bytes, dict[str, str], str]:
    """Subject, body, headers and event id of an event about to be published (the
    arguments are `publish_event`'s)."""
    check_event_type(event_type)
    if key is not None:
        check_event_key(key)
    event_id = h.check_id(h.MSG_ID, event_id) if event_id else h.new_id()
    producer = parent.service if parent is not None else client.name
    fields = h.EventFields(event_id, event_type, _now_rfc3339(), producer)
    out = h.outgoing(headers, parent=parent, correlation_id=correlation_id, event=fields)
    assert out is not None  # an event always has headers
    return event_subject(event_type, key), encode_payload(event), out, event_id


def expect_sequence(
    out: dict[str, str], event_type: str, key: str | None, expected: int | None
) -> None:
    """Optimistic concurrency: stored only if the key's last sequence is `expected`.

    With a key, the guard covers the key's events of the whole domain (what
    `history(domain, key)` reads), not only this type's; 0 means "no event yet".
    """
    if expected is None:
        return
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise ValueError(f"expected_last_subject_sequence must be an int >= 0, not {expected!r}")
    out[h.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected)
    if key is not None:
        out[h.EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT] = guard_subject(event_type, key)


def producer_span(
    event_type: str, out: dict[str, str], event_id: str, parent: Context | None
) -> Any:
    """The PRODUCER span of one event, its context injected into the event's headers.

    Named after the type's subject, without an event key: span names stay low-cardinality
    (the consumer's `process events.<type>` matches it), the event id identifies the event.
    """
    span = telemetry.start_send_span(
        "publish",
        event_subject(event_type),
        out.get(h.PRODUCER),
        telemetry.SpanKind.PRODUCER,
        parent.span if parent is not None else None,
    )
    if span.is_recording():
        span.set_attribute(telemetry.MESSAGE_ID, event_id)
        span.set_attribute(telemetry.CONVERSATION_ID, out[h.CORRELATION_ID])
    telemetry.inject_context(out, span)
    return span


def check_size(client: Client, data: bytes, out: dict[str, str]) -> None:
    """nats-py checks only the payload; headers past max_payload close the connection."""
    size = h.wire_size(data, out)
    if size > client.nc.max_payload:
        raise PublishError(
            f"event of {size} bytes (with headers) exceeds the server's max_payload of "
            f"{client.nc.max_payload}; not stored"
        )


async def publish_event(
    client: Client,
    event_type: str,
    event: Any,
    *,
    event_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    correlation_id: str | None = None,
    timeout: float = 5.0,
    parent: Context | None = None,
    key: str | None = None,
    expected_last_subject_sequence: int | None = None,
) -> PublishAck:
    """Publish and wait for the JetStream ack; the same event id is stored once.

    Args:
        event_type: `[domain.]entity.action.vN`, e.g. `order.created.v1`; the subject
            is `events.<event_type>`, stored by the domain's stream.
        event: the payload: anything msgspec encodes as JSON; bytes are sent as they are.
        event_id: the event's id, sent as `Nats-Msg-Id` (default: a new one); the same
            id published again within the stream's duplicate window is stored once.
        headers: extra headers to send.
        correlation_id: the conversation to join (default: the event starts one).
        timeout: seconds to wait for JetStream's ack.
        parent: the handler's context (what `ctx.publish` passes): its correlation
            id, trace and message id (as `Causation-Id`) carry over.
        key: an entity id (one subject token): the subject is `events.<event_type>.<key>`,
            and `Client.history` reads the entity's events back in order.
        expected_last_subject_sequence: store only if the key's last event of the domain
            (without a key: the subject's) has this stream sequence (0: none yet).

    Raises:
        ConcurrencyConflict: the expected sequence did not match; nothing was stored.
        NoStream: no stream captures the subject; nothing was stored.
        PublishError: not stored, or not known to be (no ack in time, not permitted,
            larger than the server's max_payload).
        ClientClosed: the client is closed.
    """
    client.check_open()
    built = build_event(client, event_type, event, event_id, headers, correlation_id, parent, key)
    subject, data, out, event_id = built
    expect_sequence(out, event_type, key, expected_last_subject_sequence)
    span = producer_span(event_type, out, event_id, parent)
    try:
        check_size(client, data, out)
        ack = await _send(client, subject, data, out, timeout, span)
        return PublishAck(ack.stream, ack.seq, event_id, ack.duplicate)
    finally:
        span.end()


async def _send(
    client: Client, subject: str, data: bytes, out: dict[str, str], timeout: float, span: Any
) -> PubAck:
    """A JetStream publish and its ack (retried while the stream has no reachable
    leader); every failure as a `PublishError`."""
    try:
        return await _store(client, subject, data, out, timeout)
    except Exception as exc:
        error = publish_error(subject, exc, out.get(h.EXPECTED_LAST_SUBJECT_SEQUENCE))
        telemetry.record_error(span, error)
        raise error from None


ATTEMPT_TIMEOUT = 2.0  # an unanswered publish is sent again (same id) after this long
PAUSES = (0.05, 0.1, 0.2, 0.25)  # between attempts a stream without a leader refused
# "JetStream system temporarily unavailable"; "duplicate message id is in process" (a
# retried publish whose first attempt the leader has not committed yet)
_TRANSIENT = frozenset({10008, 10158})
PROBE_TIMEOUT = 0.5  # asking JetStream why: which stream captures the subject
PROBE_AT_LEAST = 0.2  # seconds left of the timeout for that question to be asked
NO_ACK = (
    "no acknowledgement in time (the stream may have no leader reachable from this "
    "server: an election or a network partition)"
)


def is_clustered(client: Client) -> bool:
    """Whether the connected server is part of a cluster (where a stream can be without
    a reachable leader for a while)."""
    return bool(client.nc._server_info.get("cluster"))


def retryable(failure: BaseException, clustered: bool) -> bool:
    """Whether a publish's failure is what a stream without a reachable leader looks
    like, so that publishing again with the same event id may succeed: no answer in
    time; and on a cluster also "no responders" (no leader subscribed: an election, a
    partition) or JetStream's "temporarily unavailable" / "duplicate message id is in
    process". Everything else (no stream on one server, too large, not permitted, a
    real API error) fails at once. The one rule both publish paths follow."""
    if isinstance(failure, NatsTimeoutError):
        return True
    if not clustered:
        return False
    if isinstance(failure, NoRespondersError):
        return True
    return isinstance(failure, APIError) and failure.err_code in _TRANSIENT


async def _store(
    client: Client, subject: str, data: bytes, out: dict[str, str], timeout: float
) -> PubAck:
    """Publish until JetStream acknowledges, within `timeout` seconds.

    A timeout or a "no responders" on a cluster is what a stream without a reachable
    leader looks like (an election, a partition): retried with the same `Nats-Msg-Id`,
    so it is stored once. Raises `NoStream` when no stream captures the subject,
    `StreamUnavailable` when it exists but did not store the event in time.
    """
    mux = await client.mux()  # nats-py's js.publish: a request and json.loads
    deadline = anyio.current_time() + timeout
    attempts, why = 0, ""
    while True:
        attempts += 1
        left = deadline - anyio.current_time()
        try:
            # refused (permissions): the multiplexer fails the request at once
            reply = await mux.request(subject, data, min(left, ATTEMPT_TIMEOUT), out)
            ack = _decode_pub_ack(reply.data)
            if ack.error is None:
                return ack
            failure: Exception = api_error(ack.error)
        except (NatsTimeoutError, NoRespondersError) as exc:
            failure = exc
        clustered = is_clustered(client)
        if not retryable(failure, clustered):
            raise failure  # a real API error; on one server, no stream captures it
        left = deadline - anyio.current_time()
        if not why and left > PROBE_AT_LEAST:  # never past the caller's timeout
            why = await _why_not_stored(mux, subject, failure, clustered, left - 0.1)
            left = deadline - anyio.current_time()
        if left <= 0.01:
            break
        if not isinstance(failure, NatsTimeoutError):
            await anyio.sleep(min(left, PAUSES[min(attempts, len(PAUSES)) - 1]))
    if not clustered:
        raise failure
    raise StreamUnavailable(
        f"{subject}: {why or NO_ACK}; {attempts} attempt(s) in {timeout:g} s. The event was not stored "
        "(or not known stored): retry, publishing again with the same event id is safe, "
        "it is stored once"
    )


async def _why_not_stored(
    mux: Any, subject: str, failure: Exception, clustered: bool, within: float
) -> str:
    """Ask JetStream (for at most `within` seconds) which stream captures `subject`:
    `NoStream` if none does, else why that stream did not answer, in words."""
    probe = b'{"subject":' + msgspec.json.encode(subject) + b"}"
    try:
        reply = await mux.request("$JS.API.STREAM.NAMES", probe, min(PROBE_TIMEOUT, within))
        names = msgspec.json.decode(reply.data or b"{}")
    except Exception:
        if not clustered:
            return "no acknowledgement from JetStream"
        return (
            "JetStream did not answer from this server: no leader reachable "
            "(a network partition or an election)"
        )
    if names.get("error"):
        return f"JetStream is unavailable: {names['error'].get('description', names['error'])}"
    streams = names.get("streams") or []
    if not streams:
        raise NoStreamResponseError
    if isinstance(failure, NatsTimeoutError):
        return (
            f"stream {streams[0]} did not acknowledge in time (no reachable leader: an "
            "election, a network partition, or an overloaded server)"
        )
    return (
        f"stream {streams[0]} has no leader reachable from this server "
        "(an election or a network partition)"
    )


def end_span(span: Any, error: BaseException) -> None:
    telemetry.record_error(span, error)
    span.end()
