"""Domain events as they are published, filtered, for streaming to a browser.

A plain NATS subscription on the events' subjects (what JetStream stores is also
delivered to core subscribers), so watching costs no consumer on the server and
leaves nothing behind. It sees events published after it starts: read the current
state (an RPC) after entering the watch and nothing between the two is missed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..transport import headers as h
from ..transport.names import EVENT_PREFIX

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["DEFAULT_MAX_PENDING", "EventWatch", "MeshEvent", "event_subjects", "watch_events"]

DEFAULT_MAX_PENDING = 256
_log = structlog.get_logger("framework.web.events")


@dataclass(frozen=True)
class MeshEvent:
    """One published event: its type, id, decoded JSON payload and headers."""

    type: str
    id: str
    data: Any
    subject: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def correlation_id(self) -> str | None:
        """The `Correlation-Id` the event was published with."""
        return self.headers.get(h.CORRELATION_ID)


def event_subjects(event_type: str) -> list[str]:
    """Subjects of an event type (keyed ones too) or of a pattern such as `order.>`."""
    subject = f"{EVENT_PREFIX}.{event_type}"
    if event_type.endswith(">") or "*" in event_type.split("."):
        return [subject]
    return [subject, f"{subject}.>"]


def _type_of(subject: str, headers: dict[str, str]) -> str:
    declared = headers.get(h.EVENT_TYPE)
    if declared:
        return declared
    return subject.removeprefix(f"{EVENT_PREFIX}.")


def _event(msg: Any) -> MeshEvent | None:
    headers = dict(msg.headers or {})
    try:
        data = msgspec.json.decode(msg.data) if msg.data else None
    except msgspec.DecodeError:
        return None  # not a JSON event: nothing a browser could be shown
    return MeshEvent(
        type=_type_of(msg.subject, headers),
        id=headers.get(h.MSG_ID, ""),
        data=data,
        subject=msg.subject,
        headers=headers,
    )


class EventWatch:
    """`async with EventWatch(client, "order.>") as events: async for event in events: ...`

    `where` keeps the events it is true for; `until` ends the iteration after the first
    event it is true for. At most `max_pending` events wait to be read: a reader that
    falls further behind loses the newest ones (counted in `dropped`, and logged)
    rather than growing memory without bound.
    """

    def __init__(
        self,
        client: Client,
        *event_types: str,
        where: Callable[[MeshEvent], bool] | None = None,
        until: Callable[[MeshEvent], bool] | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if not event_types:
            raise ValueError("name at least one event type or pattern, e.g. 'order.>'")
        self._client = client
        self._subjects = [s for t in event_types for s in event_subjects(t)]
        self._where = where
        self._until = until
        self._max_pending = max_pending
        self._subs: list[Any] = []
        self._send: MemoryObjectSendStream[MeshEvent] | None = None
        self._receive: MemoryObjectReceiveStream[MeshEvent] | None = None
        self._done = False
        self.dropped = 0

    async def __aenter__(self) -> EventWatch:
        self._send, self._receive = anyio.create_memory_object_stream[MeshEvent](self._max_pending)
        try:
            for subject in self._subjects:
                self._subs.append(await self._client.nc.subscribe(subject, cb=self._on_message))
            await self._client.nc.flush()  # subscribed on the server before the caller reads
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe (shielded: it runs when a disconnected client cancels the stream)."""
        with anyio.CancelScope(shield=True):
            subs, self._subs = self._subs, []
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if self._send is not None:
            self._send.close()
        if self._receive is not None:
            self._receive.close()

    async def _on_message(self, msg: Any) -> None:
        event = _event(msg)
        if event is None or self._send is None:
            return
        try:
            if self._where is not None and not self._where(event):
                return
        except Exception:  # a filter that cannot read this payload: not a match
            return
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
            _log.warning("event watch reader too slow, event dropped", subject=msg.subject)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # closed while a message was being delivered

    def __aiter__(self) -> EventWatch:
        return self

    async def __anext__(self) -> MeshEvent:
        if self._done or self._receive is None:
            raise StopAsyncIteration
        try:
            event = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        if self._until is not None:
            try:
                self._done = bool(self._until(event))
            except Exception:  # a predicate that cannot read this event: not the last one
                self._done = False
        return event


def watch_events(
    client: Client,
    *event_types: str,
    where: Callable[[MeshEvent], bool] | None = None,
    until: Callable[[MeshEvent], bool] | None = None,
    max_pending: int = DEFAULT_MAX_PENDING,
) -> EventWatch:
    """Events of `event_types` (types or patterns like `order.>`) as they are published."""
    return EventWatch(client, *event_types, where=where, until=until, max_pending=max_pending)
