"""Acks of an idempotent subscriber, pipelined: mark a batch of ids, then ack each event.

A worker that awaited its own marker's store would be parked for a round trip while
the next event needed another worker: a task switch per event, the largest single cost
of an idempotent subscriber. Here a handler's success is handed over and the worker
moves on; the successes of one event-loop iteration are marked together (one
fast-ingest batch where the server allows it) and each event is acked once its marker
is stored. The usual path has no task and no wait: the batch is queued on the
connection at once and acked from its reply, as it is read (`ProcessedIds.mark_now`),
so a settled event's place goes to the next one in the same step; a batch that cannot
go that way, or fails, is settled by a task that retries. The guarantee is unchanged:
no event is acked before its marker is stored.

One such batch is on the wire at a time: what is handed over while its reply is
awaited goes out as the next batch when that reply is read. The server's cost is
mostly per batch (about 30 us a marker in batches of 16, 12 us in batches of 256,
measured on loopback), so under load batches grow to what the subscriber's
`max_unsettled` allows instead of many small batches each costing a full store;
when idle, a lone event's marker goes out at once.

A marker that cannot be stored is retried, the event kept alive by the subscriber's
in-progress acks, for as long as a handler may take; then the event is nak'd, and its
redelivery runs the handler again (the documented at-least-once window). Failing
marker writes are reported to the subscriber's `Health` (a warning once they have
failed for a few seconds, not after `give_up_after`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ..observability.logging import get_logger
from ..transport.wire import ack, ack_all_now
from .health import Health
from .idempotency import ProcessedIds

__all__ = ["Settlement"]

_log = get_logger("framework.events.subscriber")

# what `done` is told: the message, its event id, and the handler's duration when
# acked (None when nak'd or abandoned)
Done = Callable[[Any, str, int | None], None]
_Entry = tuple[Any, str, int]  # message, event id, handler duration in ns


class Settlement:
    """Marks then acks the successes of one idempotent subscriber; `done` hears of each."""

    def __init__(
        self,
        processed: ProcessedIds,
        task_group: TaskGroup,
        done: Done,
        *,
        consumer: str,
        give_up_after: float,
        nak_delay: float,
        health: Health | None = None,
    ) -> None:
        self._processed = processed
        self._health = health or Health(consumer)
        self._task_group = task_group
        self._done = done
        self._consumer = consumer
        self._give_up_after = give_up_after
        self._nak_delay = nak_delay
        self._queued: list[_Entry] = []
        self._running = 0  # batches being marked and acked
        self._sending = 0  # batches sent by `mark_now` whose reply is not read yet
        self._idle = anyio.Event()
        self._idle.set()

    def add(self, msg: Any, event_id: str, elapsed_ns: int) -> None:
        """Mark `event_id`, then ack `msg`; `done` is called once either happened."""
        self._queued.append((msg, event_id, elapsed_ns))
        if len(self._queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Mark what was handed over so far now, and write it to the server at once
        (the workers call this before they park); otherwise it happens in the next
        event-loop iteration."""
        if self._queued and self._flush():
            self._processed.write_now()

    def _flush(self) -> bool:
        """Send what is queued unless a batch is on the wire; whether a batch went now."""
        if self._sending:  # goes when that reply is read: one batch on the wire, bigger
            return False
        batch, self._queued = self._queued, []
        if not batch:
            return False
        if self._running == 0:
            self._idle = anyio.Event()
        self._running += 1
        ids = [event_id for _, event_id, _ in batch]
        if self._processed.mark_now(ids, lambda error: self._marked(batch, error)):
            self._sending += 1
            return True
        self._task_group.start_soon(self._settle, batch)
        return False

    def _marked(self, batch: list[_Entry], error: Exception | None) -> None:
        """A batch sent by `mark_now` is stored (`error` None): ack each event, as the
        reply is read. Otherwise the batch is settled the patient way (`_settle`).

        The events are reported settled first, then acked, with no wait in between:
        `done` wakes the workers for the events that take their places, and as they
        are woken before the connection's flusher is, their markers go out in the
        same socket write as these acks.
        """
        self._sending -= 1
        if error is not None:
            self._task_group.start_soon(self._settle, batch)  # still counted as running
            self._flush()
            return
        self._health.ok("markers")
        for msg, event_id, elapsed in batch:
            self._done(msg, event_id, elapsed)
        try:
            sent = ack_all_now([msg for msg, _, _ in batch])
        except Exception as exc:  # acked already (cannot be), or no reply subject
            _log.warning("ack failed", consumer=self._consumer, error=str(exc))
            sent = False
        if sent:
            self._finished()
        else:  # reconnecting or a full buffer: acks that must wait for room
            self._task_group.start_soon(self._ack_all, batch)
        self._flush()

    async def _ack_all(self, entries: list[_Entry]) -> None:
        try:
            for msg, _, _ in entries:
                try:
                    await ack(msg)
                except Exception as exc:  # back after ack_wait; its marker skips it
                    _log.warning("ack failed", consumer=self._consumer, error=str(exc))
        finally:
            self._finished()

    def _finished(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def wait(self, timeout: float) -> bool:
        """Whether everything handed over was settled within `timeout` seconds."""
        with anyio.move_on_after(timeout):
            while self._queued or self._running:
                await self._idle.wait()
                await anyio.lowlevel.checkpoint()  # a flush scheduled meanwhile
            return True
        return False

    async def _settle(self, batch: list[_Entry]) -> None:
        todo = {id(entry[0]): entry for entry in batch}  # not yet acked or nak'd
        delay = 0.1
        give_up = anyio.current_time() + self._give_up_after
        try:
            while todo:
                entries = list(todo.values())
                attempt_began = time.monotonic()
                errors = await self._processed.mark_all([event_id for _, event_id, _ in entries])
                for entry, error in zip(entries, errors, strict=True):
                    if error is None:
                        del todo[id(entry[0])]
                        await self._ack(entry)
                if not todo:
                    self._health.ok("markers")
                    return
                failure = next(e for e in errors if e is not None)
                self._health.failed("markers", _why(failure), since=attempt_began)
                if anyio.current_time() + delay > give_up:
                    _log.warning(
                        "event deferred: marker not stored",
                        consumer=self._consumer,
                        events=len(todo),
                        error=_why(failure),
                    )
                    for key, entry in list(todo.items()):
                        del todo[key]
                        await self._nak(entry)
                    return
                await anyio.sleep(delay)
                delay = min(delay * 2, 2.0)
        except Exception as exc:  # a bug here must not lose the events' accounting
            _log.error(
                "event settlement failed", consumer=self._consumer, error=str(exc), exc_info=exc
            )
        finally:
            for msg, event_id, _ in todo.values():  # cancelled: redelivered after ack_wait
                self._done(msg, event_id, None)
            self._finished()

    async def _ack(self, entry: _Entry) -> None:
        msg, event_id, elapsed = entry
        try:
            await ack(msg)
        except Exception as exc:  # the event comes back after ack_wait; its marker skips it
            _log.warning("ack failed", consumer=self._consumer, error=str(exc))
        finally:
            self._done(msg, event_id, elapsed)

    async def _nak(self, entry: _Entry) -> None:
        msg, event_id, _ = entry
        try:
            await msg.nak(delay=self._nak_delay)
        except Exception:
            pass  # redelivered after ack_wait instead
        finally:
            self._done(msg, event_id, None)


def _why(error: Exception) -> str:
    """An error as the server put it (a bare timeout says which wait ran out)."""
    return str(error) or f"{type(error).__name__} (no reply)"
