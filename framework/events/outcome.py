"""Outcome policy: what happens to an event after an attempt that did not succeed.

A failure naks with the backoff delay of that attempt; the last attempt, an event
whose headers or payload cannot be read, a key function that fails, or `Reject` copy
the event to the dead-letter stream and then terminate it, so a poison event never
blocks the ones behind it. A dead letter that cannot be stored keeps the original
(nak'd with the longest delay), so nothing is lost. (Success is an ack, done inline by
the processor, or a mark-then-ack by `Settlement` for an idempotent subscriber.)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from ..context import Context
from ..errors import PublishError, Reject
from ..observability.logging import get_logger
from ..observability.stats import HandlerStats
from .consumer import Consumer
from .deadletter import send_to_dead_letter

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Outcomes", "ProcessingTimeExceeded", "describe"]

_log = get_logger("framework.events.subscriber")


class ProcessingTimeExceeded(TimeoutError):
    """A handler ran past `max_processing_time` and was cancelled: a failed attempt."""


def describe(exc: BaseException) -> str:
    """An exception as a dead letter's or a stats' error text."""
    if isinstance(exc, ProcessingTimeExceeded):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Outcomes:
    """Retry later, or dead-letter then terminate, per the subscriber's options."""

    def __init__(self, client: Client, consumer: Consumer, stats: HandlerStats) -> None:
        self._client = client
        self._consumer = consumer
        self._options = consumer.options
        self._stats = stats

    async def handler_failed(
        self, msg: Msg, exc: Exception, elapsed_ns: int, ctx: Context, sequence: int
    ) -> None:
        """The handler raised after `elapsed_ns`: `Reject` is dead-lettered now, anything
        else retried with backoff until the last attempt."""
        attempt, event_id, log = ctx.attempt, ctx.event_id or "-", ctx.log
        if isinstance(exc, Reject):
            self._stats.record(elapsed_ns, f"rejected: {exc.reason}")
            await self.dead_letter(msg, "rejected", exc.reason, attempt, sequence, event_id)
            return
        error = describe(exc)
        self._stats.record(elapsed_ns, error)
        if attempt >= self._options.max_deliver:
            log.error("event handler failed, last attempt", error=error, exc_info=exc)
            await self.dead_letter(msg, "max_deliver", error, attempt, sequence, event_id)
            return
        delay = self._options.retry_delay(attempt)
        log.warning("event handler failed, will retry", error=error, retry_in=delay)
        await msg.nak(delay=delay)

    async def settling_failed(self, msg: Msg, exc: Exception) -> None:
        """Acking, naking or dead-lettering raised (NATS away, or a bug): the event is
        handed back for a retry, and the worker lives on."""
        consumer = self._consumer.durable
        if isinstance(exc, NatsError | TimeoutError | OSError):
            _log.warning("event deferred: NATS unavailable", consumer=consumer, error=str(exc))
        else:
            _log.error("event settlement failed", consumer=consumer, error=str(exc), exc_info=exc)
        with contextlib.suppress(Exception):
            await msg.nak(delay=self._options.backoff[0])

    async def dead_letter(
        self, msg: Msg, reason: str, error: str, attempt: int, sequence: int, event_id: str
    ) -> None:
        """Copy to the dead-letter stream (when enabled), then terminate."""
        if self._options.dead_letter and not await self._copy(
            msg, reason, error, attempt, sequence, event_id
        ):
            return
        self._stats.dead_lettered += 1
        _log.error(
            "event dead-lettered",
            service=self._consumer.service,
            handler=self._consumer.name,
            reason=reason,
            error=error,
            attempt=attempt,
            event_id=event_id,
            stream_sequence=sequence,
        )
        await msg.term()

    async def _copy(
        self, msg: Msg, reason: str, error: str, attempt: int, sequence: int, event_id: str
    ) -> bool:
        """Whether the copy was stored; if not, the original is kept (nak'd) for later."""
        try:
            await send_to_dead_letter(
                self._client,
                service=self._consumer.service,
                handler=self._consumer.name,
                reason=reason,
                error=error,
                attempts=attempt,
                subject=msg.subject,
                stream=self._consumer.stream,
                sequence=sequence,
                event_id=event_id,
                data=msg.data,
                original_headers=msg.headers,
            )
        except PublishError as exc:  # keep the original: it comes back later
            _log.error(
                "dead letter not stored, will retry",
                consumer=self._consumer.durable,
                error=str(exc),
            )
            await msg.nak(delay=self._options.backoff[-1])
            return False
        return True
