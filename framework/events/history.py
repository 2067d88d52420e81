"""One key's events read back in stream order: what event sourcing folds into state.

A keyed event lives at `events.<type>.<key>` (see `publish(..., key=...)`), so one
entity's events are the stream's messages whose subject ends with its key. They are
read with batched direct gets (ADR-31: `next_by_subj` with a wildcard subject, pages of
up to `PAGE` messages ending in an `EOB` status): no consumer is created, nothing is
left behind on the server, and any replica of the stream can answer.

A direct get from a stream replica may lag the leader by a moment, so a history read
right after a publish can miss that newest event; a writer that decides from the
history guards its next publish with `expected_last_subject_sequence` and reads again
on `ConcurrencyConflict`, which makes a stale read harmless.
"""

from __future__ import annotations

import builtins
import weakref
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec
from nats.js.errors import NotFoundError

from ..errors import JetStreamError
from ..transport import headers as h
from ..transport.names import EVENT_PREFIX, check_event_type, event_domain, key_subjects

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["EventRecord", "read_history"]

T = TypeVar("T")
PAGE = 256  # messages per direct-get batch
DEFAULT_LIMIT = 10_000

_streams: weakref.WeakKeyDictionary[Client, dict[str, str]] = weakref.WeakKeyDictionary()


class EventRecord(msgspec.Struct, frozen=True):
    """One stored event of a key, as JetStream holds it.

    Attributes:
        type: the event type (`order.created.v1`), from the subject.
        key: the entity key the event was published with.
        sequence: the stream sequence, the order of the key's events and what
            `expected_last_subject_sequence` names.
        time: when the stream stored it (UTC).
        subject: the full subject (`events.order.created.v1.ord-1`).
        event_id: the `Nats-Msg-Id`, or `<stream>-<sequence>` for an event without one
            (e.g. one produced by a message schedule).
        headers: every header stored with it (correlation id, trace context, ...).
        data: the payload, JSON; `decode(tp)` turns it into a typed value.
    """

    type: str
    key: str
    sequence: int
    time: datetime
    subject: str
    event_id: str
    headers: dict[str, str]
    data: bytes

    def decode(self, tp: builtins.type[T]) -> T:
        """The payload as `tp` (a msgspec Struct or any msgspec type)."""
        return msgspec.json.decode(self.data, type=tp)


async def read_history(
    client: Client,
    type_or_domain: str,
    key: str,
    *,
    after: int = 0,
    limit: int = DEFAULT_LIMIT,
    timeout: float = 5.0,
) -> list[EventRecord]:
    """The key's events of one type (`order.created.v1`) or of a whole domain (`order`),
    oldest first; only those with a stream sequence above `after`, at most `limit`.

    An unknown key has no events: the result is empty, not an error.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    domain = event_domain(type_or_domain) if "." in type_or_domain else type_or_domain
    subjects = key_subjects(type_or_domain, key)
    stream = await _stream_of(client, domain, subjects[0])
    records: list[EventRecord] = []
    for subject in subjects:
        records += await _read_subject(client, stream, subject, key, after, limit, timeout)
    records.sort(key=lambda record: record.sequence)
    return records[:limit]


async def _stream_of(client: Client, domain: str, subject: str) -> str:
    """The stream that captures the domain's events (cached per client)."""
    known = _streams.setdefault(client, {})
    stream = known.get(domain)
    if stream is None:
        try:
            stream = str(await client.js.find_stream_name_by_subject(subject))
        except NotFoundError:
            raise JetStreamError(f"no stream captures {subject}: nothing was ever stored") from None
        known[domain] = stream
    return stream


async def _read_subject(
    client: Client, stream: str, subject: str, key: str, after: int, limit: int, timeout: float
) -> list[EventRecord]:
    records: list[EventRecord] = []
    start = after + 1
    while len(records) < limit:
        page, pending = await _page(client, stream, subject, start, min(PAGE, limit), timeout)
        records += [r for r in (_record(m, stream, key) for m in page) if r is not None]
        if not page or pending == 0:
            break
        start = int(page[-1].headers["Nats-Sequence"]) + 1
    return records[:limit]


async def _page(
    client: Client, stream: str, subject: str, start: int, batch: int, timeout: float
) -> tuple[list[Any], int]:
    """One batched direct get: the messages, and how many more match after them."""
    nc = client.nc
    inbox = nc.new_inbox()
    messages: list[Any] = []
    done = anyio.Event()
    failure: list[str] = []

    async def on_message(msg: Any) -> None:
        status = (msg.headers or {}).get("Status")
        if status is None:
            messages.append(msg)
            return
        if status not in ("204", "404"):  # 204: end of the batch, 404: nothing matches
            failure.append(f"{status} {(msg.headers or {}).get('Description', '')}".strip())
        done.set()

    request = {"seq": start, "next_by_subj": subject, "batch": batch}
    sub = await nc.subscribe(inbox, cb=on_message)
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode(request), reply=inbox)
        with anyio.move_on_after(timeout):
            await done.wait()
    finally:
        await sub.unsubscribe()
    if not done.is_set():
        raise JetStreamError(f"no answer from stream {stream} within {timeout:g}s for {subject}")
    if failure:
        raise JetStreamError(f"stream {stream} refused to read {subject}: {failure[0]}")
    pending = int(messages[-1].headers.get("Nats-Num-Pending", "0")) if messages else 0
    return messages, pending


def _record(msg: Any, stream: str, key: str) -> EventRecord | None:
    """The message as a record; None for a subject that only looks keyed (an unkeyed
    `events.shop.order.created.v1` matches `events.shop.*.*.v1` when the key is `v1`)."""
    headers: dict[str, str] = dict(msg.headers)
    subject = headers.get("Nats-Subject", "")
    event_type = subject[len(EVENT_PREFIX) + 1 : -len(key) - 1]
    try:
        check_event_type(event_type)
    except ValueError:
        return None
    sequence = int(headers["Nats-Sequence"])
    return EventRecord(
        type=event_type,
        key=key,
        sequence=sequence,
        time=_parse_time(headers.get("Nats-Time-Stamp", "")),
        subject=subject,
        event_id=headers.get(h.MSG_ID) or f"{stream}-{sequence}",
        headers=headers,
        data=bytes(msg.data),
    )


def _parse_time(stamp: str) -> datetime:
    """RFC 3339 with nanoseconds (`2026-11-25T23:46:32.873830924Z`) to microseconds."""
    if not stamp:
        return datetime.fromtimestamp(0, UTC)
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    micros = int((fraction + "000000")[:6]) if fraction else 0
    return datetime.fromisoformat(whole).replace(microsecond=micros, tzinfo=UTC)
