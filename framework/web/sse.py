"""Server-sent events from anything the mesh produces: events, job statuses, snapshots.

Framing, heartbeats and client disconnects are sse-starlette's; what is added here is
the mapping from mesh objects to `event:`/`id:`/`data:` and an `end` event, so that a
browser's `EventSource` (which reconnects whenever a stream ends) knows to close.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

import anyio
import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent

from .events import EventWatch, MeshEvent

__all__ = ["DEFAULT_PING", "END_EVENT", "job_events", "sse", "to_sse"]

DEFAULT_PING = 15.0
DEFAULT_SEND_TIMEOUT = 30.0
END_EVENT = "end"


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def to_sse(item: Any, number: int) -> ServerSentEvent:
    """One item as an SSE message: a `MeshEvent` is named by its type and keeps its id;
    anything else JSON-encodable is a `message` numbered in the stream."""
    if isinstance(item, ServerSentEvent):
        return item
    if isinstance(item, MeshEvent):
        return ServerSentEvent(data=_json(item.data), event=item.type, id=item.id or str(number))
    return ServerSentEvent(data=_json(item), event="message", id=str(number))


async def _frames(source: AsyncIterable[Any], end: bool) -> AsyncIterator[ServerSentEvent]:
    entered = isinstance(source, EventWatch)
    try:
        if entered:
            assert isinstance(source, EventWatch)
            await source.__aenter__()
        counter = itertools.count(1)
        async for item in source:
            yield to_sse(item, next(counter))
        if end:
            yield ServerSentEvent(data="{}", event=END_EVENT)
    finally:
        # a client that went away cancels us mid-stream: close the source all the same
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await aclose()


def sse(
    source: AsyncIterable[Any],
    *,
    ping: float = DEFAULT_PING,
    end: bool = True,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
    headers: Mapping[str, str] | None = None,
) -> EventSourceResponse:
    """A `text/event-stream` response of `source` (events, statuses, dicts, Structs).

    `ping`: seconds between heartbeat comments, which keep proxies from closing an idle
    stream; `end`: send `event: end` when the source is exhausted; `send_timeout`: a
    client that takes no data for this long is dropped (and its source closed).
    An `EventWatch` is entered here, so `sse(edge.events(...))` is enough.
    """
    return EventSourceResponse(
        _frames(source, end), ping=ping, send_timeout=send_timeout, headers=headers
    )


async def job_events(handle: Any) -> AsyncIterator[ServerSentEvent]:
    """A job's statuses as `event: status` messages, from `handle.watch()` until final.

    `id:` counts the changes, so a client's `Last-Event-ID` says how far it got; a
    reconnecting browser simply gets the current status first again.
    """
    number = 0
    async for status in handle.watch():
        number += 1
        # every field, defaults included: a browser reads `progress` 0.0 as well as 1.0
        whole = msgspec.structs.asdict(status) if isinstance(status, msgspec.Struct) else status
        yield ServerSentEvent(data=_json(whole), event="status", id=str(number))
