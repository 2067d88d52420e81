"""Dead letters: events that cannot be handled, kept with why, and replayable.

A dead letter is a copy of the original message (payload and headers) in the
`DEADLETTER` stream at `deadletter.<service>.<handler>`, with headers saying why.
(`handler` here, on the wire and in `DeadLetter`, is the subscriber's name.)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import Error as NatsError
from nats.js.errors import APIError, NotFoundError

from ..errors import NotFound, PublishError
from ..streams import DEADLETTER_STREAM
from ..transport import headers as h
from ..transport.wire_errors import mesh_error, publish_error
from .publish import PublishAck

if TYPE_CHECKING:
    from ..client import Client

__all__ = [
    "DeadLetter",
    "discard_dead_letter",
    "get_dead_letter",
    "list_dead_letters",
    "replay_dead_letter",
    "send_to_dead_letter",
]

REASON = "Dead-Letter-Reason"
ERROR = "Dead-Letter-Error"
ATTEMPTS = "Dead-Letter-Attempts"
SUBJECT = "Dead-Letter-Subject"
STREAM = "Dead-Letter-Stream"
SEQUENCE = "Dead-Letter-Sequence"
SERVICE = "Dead-Letter-Service"
HANDLER = "Dead-Letter-Handler"
TIME = "Dead-Letter-Time"
EVENT_ID = "Dead-Letter-Event-Id"
REPLAY_OF = "Replay-Of"
_NO_MESSAGE_FOUND = 10057  # JetStream's err_code for deleting a sequence that is gone
_OWN = frozenset(
    {REASON, ERROR, ATTEMPTS, SUBJECT, STREAM, SEQUENCE, SERVICE, HANDLER, TIME, EVENT_ID}
)


# Headers that tell JetStream what to check or do when storing (an event published with
# `expected_last_subject_sequence`, a scheduled one): they applied to the original
# publish; copied along they would refuse or reschedule the dead letter and its replay.
_DIRECTIVES = (
    "Nats-Expected-",
    "Nats-Batch-",
    "Nats-Schedule",
    "Nats-Rollup",
    "Nats-TTL",
    "Nats-Incr",
    "Nats-Required-Api-Level",
)


class DeadLetter(msgspec.Struct, kw_only=True):
    """An event that could not be handled, with why (what `mesh dlq show` prints).

    Attributes:
        id: its sequence in the `DEADLETTER` stream (what `get`/`replay` take).
        service, handler: the service and subscriber (its name) that gave up on it.
        reason: `max_deliver`, `undecodable`, `rejected`, `invalid_headers`, `invalid_key`.
        error: the last error, on one line (at most 500 characters).
        attempts: deliveries made before it was dead-lettered.
        subject, stream, sequence: where the original is (or was) stored.
        event_id, event_type: the original event's id and type.
        time: when it was dead-lettered (epoch seconds).
        headers: the original's headers; data: its payload, as text.
    """

    id: int  # sequence in the DEADLETTER stream
    service: str
    handler: str  # the subscriber's name
    reason: str  # max_deliver | undecodable | rejected | invalid_headers | invalid_key
    error: str
    attempts: int
    subject: str
    stream: str
    sequence: int
    event_id: str
    event_type: str
    time: float
    headers: dict[str, str]
    data: str


async def send_to_dead_letter(
    client: Client,
    *,
    service: str,
    handler: str,
    reason: str,
    error: str,
    attempts: int,
    subject: str,
    stream: str,
    sequence: int,
    event_id: str,
    data: bytes,
    original_headers: Mapping[str, str] | None,
) -> None:
    """Stored before the original is terminated; a retry after a crash is deduplicated."""
    out = {
        k: v
        for k, v in (original_headers or {}).items()
        if k not in _OWN and not k.startswith(_DIRECTIVES)
    }
    out.update(
        {
            REASON: reason,
            ERROR: _one_line(error)[:500] or "-",
            ATTEMPTS: str(attempts),
            SUBJECT: subject,
            STREAM: stream,
            SEQUENCE: str(sequence),
            SERVICE: service,
            HANDLER: handler,
            TIME: f"{time.time():.3f}",
            EVENT_ID: event_id,
            h.MSG_ID: f"dl-{service}-{handler}-{stream}-{sequence}",
        }
    )
    if h.wire_size(data, out) > client.nc.max_payload:
        out["Dead-Letter-Truncated"] = str(len(data))  # the original stays at stream/sequence
        data = b""
    try:
        await client.js.publish(f"deadletter.{service}.{handler}", data, headers=out, timeout=5.0)
    except Exception as exc:
        raise PublishError(f"could not store dead letter: {exc}") from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _from_raw(raw: Any) -> DeadLetter:
    hdrs: dict[str, str] = dict(raw.headers or {})
    original = {k: v for k, v in hdrs.items() if k not in _OWN}
    original.pop(h.MSG_ID, None)
    event_id = hdrs.get(EVENT_ID, "")
    return DeadLetter(
        id=raw.seq,
        service=hdrs.get(SERVICE, ""),
        handler=hdrs.get(HANDLER, ""),
        reason=hdrs.get(REASON, ""),
        error=hdrs.get(ERROR, ""),
        attempts=int(hdrs.get(ATTEMPTS, "0") or 0),
        subject=hdrs.get(SUBJECT, ""),
        stream=hdrs.get(STREAM, ""),
        sequence=int(hdrs.get(SEQUENCE, "0") or 0),
        event_id=event_id,
        event_type=hdrs.get(h.EVENT_TYPE, ""),
        time=float(hdrs.get(TIME, "0") or 0),
        headers=original,
        data=(raw.data or b"").decode("utf-8", "replace"),
    )


async def get_dead_letter(client: Client, dead_letter_id: int) -> DeadLetter:
    """The dead letter with that id; `NotFound` when there is none."""
    client.check_open()
    try:
        raw = await client.js.get_msg(DEADLETTER_STREAM, dead_letter_id)
    except NotFoundError:
        raise NotFound(f"no dead letter {dead_letter_id}") from None
    except NatsError as exc:
        raise mesh_error(exc, f"reading dead letter {dead_letter_id}") from None
    return _from_raw(raw)


async def list_dead_letters(
    client: Client, *, service: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    """Dead letters, oldest first: at most `limit`, only `service`'s when given."""
    client.check_open()
    try:
        info = await client.js.stream_info(DEADLETTER_STREAM)
    except NotFoundError:
        return []
    except NatsError as exc:
        raise mesh_error(exc, "listing dead letters") from None
    found: list[DeadLetter] = []
    seq = info.state.first_seq
    subject = f"deadletter.{service}.>" if service else "deadletter.>"
    while len(found) < limit and seq <= info.state.last_seq:
        try:
            raw = await client.js.get_msg(DEADLETTER_STREAM, seq, subject=subject, next=True)
        except NotFoundError:
            break
        except NatsError as exc:
            raise mesh_error(exc, "listing dead letters") from None
        found.append(_from_raw(raw))
        seq = raw.seq + 1
    return found


async def replay_dead_letter(client: Client, dead_letter_id: int) -> PublishAck:
    """Re-publish to the original subject with the original headers, as a new attempt.

    The event keeps its id (`Replay-Of`), so services that already handled it skip it;
    the message id is new so the stream's dedupe window does not swallow the replay.
    The dead letter is removed once the replay is stored. Returns where it was stored.
    """
    letter = await get_dead_letter(client, dead_letter_id)
    out = dict(letter.headers)
    out[REPLAY_OF] = letter.event_id
    out[h.MSG_ID] = f"{letter.event_id}-replay-{dead_letter_id}"
    try:
        ack = await client.js.publish(
            letter.subject, letter.data.encode(), headers=out, timeout=5.0
        )
    except Exception as exc:
        reason = publish_error(letter.subject, exc)
        raise type(reason)(f"replay of dead letter {dead_letter_id} failed: {reason}") from exc
    try:
        await client.js.delete_msg(DEADLETTER_STREAM, dead_letter_id)
    except NatsError as exc:
        raise mesh_error(exc, f"removing replayed dead letter {dead_letter_id}") from None
    return PublishAck(ack.stream, ack.seq, letter.event_id, bool(ack.duplicate))


async def discard_dead_letter(client: Client, dead_letter_id: int) -> None:
    """Delete a dead letter for good (its event is not handled); NotFound if it is gone."""
    client.check_open()
    try:
        await client.js.delete_msg(DEADLETTER_STREAM, dead_letter_id)
    except APIError as error:
        # a missing stream is 404; a missing message is code 500, err_code 10057
        if isinstance(error, NotFoundError) or error.err_code == _NO_MESSAGE_FOUND:
            raise NotFound(f"no dead letter {dead_letter_id}") from None
        raise mesh_error(error, f"discarding dead letter {dead_letter_id}") from None
    except NatsError as error:
        raise mesh_error(error, f"discarding dead letter {dead_letter_id}") from None
