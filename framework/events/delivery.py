"""What one JetStream delivery says about itself, read cheaply, as small typed values.

`AckInfo` comes from the ack subject (stream, attempt, stream sequence, pending count),
`EventHeaders` from the framework's headers (event, correlation and causation ids), and
a `Delivery` carries both, read once on arrival, from screening to the worker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import msgspec
from nats.aio.msg import Msg

from ..errors import BadRequest
from ..transport import headers as h
from ..transport.names import ack_fields
from .deadletter import REPLAY_OF

__all__ = [
    "AckInfo",
    "Delivery",
    "EventHeaders",
    "ack_info",
    "parse_ack_subject",
    "read_delivery",
    "read_event_headers",
]


class AckInfo(msgspec.Struct, frozen=True, gc=False):
    """Where a delivery stands, from its ack subject."""

    stream: str
    attempt: int  # 1 on the first delivery
    sequence: int  # in the stream
    pending: int  # what the consumer has not delivered yet: the lag


class EventHeaders(msgspec.Struct, frozen=True):
    """The ids a delivered event carries (a replayed dead letter keeps its original id)."""

    event_id: str
    correlation_id: str
    causation_id: str | None


class Delivery(msgspec.Struct):
    """A delivery read on arrival by an idempotent subscriber's screening."""

    msg: Msg
    ack: AckInfo
    headers: EventHeaders | None  # None: invalid, the worker reads them again to say why
    seen: bool | None = None  # already handled? None: not known, the worker asks
    arrived: float = 0.0  # time.monotonic() on arrival: the server's ack_wait runs since
    marks: int = 0  # `InFlight.marks` when `seen` was looked up


def parse_ack_subject(reply: str) -> AckInfo | None:
    """Stream, delivery attempt, stream sequence and pending count from an ack subject
    (`ack_fields`), or None for a form not known."""
    fields = ack_fields(reply)
    if fields is None:
        return None
    try:
        return AckInfo(fields[0], int(fields[2]), int(fields[3]), int(fields[6]))
    except ValueError:
        return None


def ack_info(msg: Msg) -> AckInfo:
    """`parse_ack_subject`, or nats-py's slower metadata for a form it does not know."""
    info = parse_ack_subject(msg.reply)
    if info is None:
        meta = msg.metadata
        info = AckInfo(meta.stream, meta.num_delivered, meta.sequence.stream, meta.num_pending)
    return info


def read_event_headers(headers: Mapping[str, str] | None, fallback_id: str) -> EventHeaders:
    """The event's ids, checked (`BadRequest` if malformed); `fallback_id` when absent."""
    if not headers:
        return EventHeaders(fallback_id, fallback_id, None)
    h.check_headers(headers)
    event_id = headers.get(REPLAY_OF) or headers.get(h.MSG_ID) or fallback_id
    h.check_id(h.MSG_ID, event_id)
    correlation_id = headers.get(h.CORRELATION_ID) or event_id
    causation_id = headers.get(h.CAUSATION_ID) or None
    return EventHeaders(
        event_id,
        h.check_id(h.CORRELATION_ID, correlation_id),
        h.check_id(h.CAUSATION_ID, causation_id) if causation_id else None,
    )


def read_delivery(msg: Msg) -> Delivery:
    """Both reads of a delivery; malformed headers are left for the worker to report."""
    ack = ack_info(msg)
    try:
        headers: EventHeaders | None = read_event_headers(
            msg.headers, f"{ack.stream}-{ack.sequence}"
        )
    except BadRequest:
        headers = None
    return Delivery(msg, ack, headers, arrived=time.monotonic())
