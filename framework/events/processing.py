"""Processing one delivery: read it, decode it, run the handler, settle the outcome.

This is the hot path, one call chain per event (`process` -> `_process` -> `_run`),
kept in one object so nothing is looked up twice: the handler's success is an ack (or,
for an idempotent subscriber, a marker then an ack, pipelined by `Settlement`); every
other outcome goes to `Outcomes`. A handler past `max_processing_time` is cancelled by
the subscriber's one `Watchdog`; events with equal `ordered_by` keys take turns.

An idempotent subscriber claims each event id in its `InFlight` table right before the
handler runs: a delivery of an id this process is running or settling, or has just
marked, does not run again; a lookup too old to trust (made before marks the table no
longer holds, or half an `ack_wait` ago) is made again; and a delivery held here past
`ack_wait` (the process or the server was paused) is dropped unrun, because the
server has taken it back and its redelivery, here or to another replica, decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Hashable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from nats.aio.msg import Msg

from ..context import Context
from ..errors import BadRequest
from ..observability import tracing as telemetry
from ..observability.stats import HandlerStats
from ..transport.codec import DECODE_ERRORS, decoder_for
from ..transport.signature import Handler, HandlerSignature
from .consumer import Consumer
from .delivery import AckInfo, Delivery, EventHeaders, ack_info, read_event_headers
from .health import Health
from .idempotency import ProcessedIds
from .inflight import Claim, InFlight
from .outcome import Outcomes, ProcessingTimeExceeded, describe
from .pull import Puller
from .settle import Settlement
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Processor"]


class _KeyLocks:
    """Per-key locks that exist only while someone holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[anyio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _no_admission() -> None:
    """`readmit` of a subscriber without screening: nothing was admitted."""


class Processor:
    """The worker pool's job for one subscriber, from `start` to `stop`.

    `deferred` holds the deliveries (by `id`) that succeeded and wait for their marker:
    they stay taken until `Settlement` acks or naks them and calls `settled`.
    """

    def __init__(
        self,
        client: Client,
        handler: Handler,
        signature: HandlerSignature,
        consumer: Consumer,
        stats: HandlerStats,
        *,
        outcomes: Outcomes,
        puller: Puller,
        readmit: Callable[[], None] | None,
        processed: ProcessedIds | None,
        task_group: TaskGroup,
        inflight: InFlight | None = None,
        health: Health | None = None,
    ) -> None:
        options = consumer.options
        self._client = client
        self._handler = handler
        self._signature = signature
        self._decoder = decoder_for(signature.payload_type)
        self._consumer = consumer
        self._max_deliver = options.max_deliver
        self._ordered_by = options.ordered_by
        self._stats = stats
        self._outcomes = outcomes
        self._active = puller.active  # the same dict: the puller keeps these alive
        self._release = puller.release
        self._readmit = readmit or _no_admission
        self._processed = processed
        if processed is not None and inflight is None:
            inflight = InFlight()
        self._inflight = inflight if processed is not None else None
        self._health = health or Health(consumer.durable)
        self._ack_wait, self._retry_delay = options.ack_wait, options.backoff[0]
        self._locks = _KeyLocks()
        self._span_name = f"process {consumer.subject}"
        self._span_attributes = telemetry.handler_attributes(
            consumer.service, consumer.subject, consumer.durable
        )
        limit = options.max_processing_time
        self._watchdog = Watchdog(limit) if limit is not None else None
        self._settlement = self._settling(processed, task_group, limit or 60.0)
        self.deferred: set[int] = set()  # handled, in the settlement's hands
        self.duplicates = 0  # events skipped as already handled (or handled here now)
        self.expired = 0  # deliveries dropped unrun: held here past ack_wait

    def _settling(
        self, processed: ProcessedIds | None, task_group: TaskGroup, give_up_after: float
    ) -> Settlement | None:
        """An idempotent subscriber's mark-then-ack pipeline (None: ack at once)."""
        if processed is None:
            return None
        return Settlement(
            processed,
            task_group,
            self.settled,
            consumer=self._consumer.durable,
            give_up_after=give_up_after,
            nak_delay=self._retry_delay,
            health=self._health,
        )

    async def process(self, item: Msg | Delivery) -> None:
        """One delivery, whatever happens: the worker always lives on."""
        if isinstance(item, Delivery):
            delivery, msg = item, item.msg
        else:
            delivery, msg = None, item
        key = id(msg)
        # in-progress acks (the puller's) count from the delivery's arrival
        self._active[key] = (msg, delivery.arrived if delivery is not None else time.monotonic())
        stats = self._stats
        stats.in_flight += 1
        try:
            await self._process(msg, delivery)
        except Exception as exc:  # never lose the worker; hand the event back for a retry
            await self._outcomes.settling_failed(msg, exc)
        finally:
            stats.in_flight -= 1
            if key not in self.deferred:
                self._release(key)
                if delivery is not None:
                    self._readmit()

    def settled(self, msg: Msg, event_id: str, elapsed_ns: int | None) -> None:
        """The settlement acked (`elapsed_ns` is the handler's time) or nak'd the event."""
        if elapsed_ns is not None:
            self._stats.record(elapsed_ns)
        if self._inflight is not None:
            self._inflight.release(event_id, marked=elapsed_ns is not None)
        key = id(msg)
        self.deferred.discard(key)
        self._release(key)
        self._readmit()

    async def wait_settled(self, timeout: float) -> bool:
        """Whether every success handed to the settlement was acked within `timeout`."""
        return True if self._settlement is None else await self._settlement.wait(timeout)

    def close(self) -> None:
        """Stop the watchdog's timer (the subscriber has stopped)."""
        if self._watchdog is not None:
            self._watchdog.close()

    async def _process(self, msg: Msg, delivery: Delivery | None) -> None:
        ack = delivery.ack if delivery is not None else ack_info(msg)
        attempt, sequence = ack.attempt, ack.sequence
        consumer = self._consumer
        if sequence > consumer.lag_sequence:  # lag as of the newest delivery
            consumer.lag_sequence, consumer.pending = sequence, ack.pending
        if attempt > 1:
            self._stats.redelivered += 1
        headers = delivery.headers if delivery is not None else None
        if headers is None:
            try:
                headers = read_event_headers(msg.headers, f"{ack.stream}-{sequence}")
            except BadRequest as exc:
                return await self._outcomes.dead_letter(
                    msg, "invalid_headers", exc.message, attempt, sequence, "-"
                )
        if attempt > self._max_deliver:
            return await self._outcomes.dead_letter(
                msg,
                "max_deliver",
                "the previous attempt did not finish",
                attempt,
                sequence,
                headers.event_id,
            )
        try:
            event = self._decoder.decode(msg.data)
        except DECODE_ERRORS as exc:
            self._stats.record(0, f"undecodable: {exc}")
            return await self._outcomes.dead_letter(
                msg, "undecodable", str(exc), attempt, sequence, headers.event_id
            )
        if self._ordered_by is None:
            return await self._run(msg, event, headers, ack, delivery)
        try:
            key = self._ordered_by(event)
            hash(key)
        except Exception as exc:  # retrying cannot change the key: a poison event
            error = f"ordered_by failed: {describe(exc)}"
            self._stats.record(0, error)
            return await self._outcomes.dead_letter(
                msg, "invalid_key", error, attempt, sequence, headers.event_id
            )
        if delivery is not None and self._inflight is not None and self._expired(msg):
            return None  # checked before the wait for the key: in-progress acks go on then
        async with self._locks.hold(key):
            return await self._run(msg, event, headers, ack, delivery)

    async def _run(
        self,
        msg: Msg,
        event: Any,
        headers: EventHeaders,
        ack: AckInfo,
        delivery: Delivery | None,
    ) -> None:
        inflight = self._inflight
        if inflight is not None:
            claim = self._claim(msg, headers, ack, delivery)
            if claim is None:
                claim = await self._claim_after_look_up(headers, ack)
            if claim is not Claim.CLAIMED:
                return await self._skip(msg, claim, headers.event_id, ack.sequence)
        settling = False  # the claim is released by the settlement, or below
        started = time.perf_counter_ns()
        span = self._span(msg, headers, ack)
        ctx = self._context(msg, headers, ack, span)
        token = telemetry.activate(span)  # user code and ctx.call/publish nest under it
        try:
            await self._invoke(event, ctx)
        except Exception as exc:
            telemetry.record_error(span, exc)
            elapsed = time.perf_counter_ns() - started
            await self._outcomes.handler_failed(msg, exc, elapsed, ctx, ack.sequence)
        else:
            elapsed = time.perf_counter_ns() - started
            if self._settlement is not None:  # acked once the marker is stored
                self.deferred.add(id(msg))
                self._settlement.add(msg, headers.event_id, elapsed)
                settling = True
            else:
                await msg.ack()
                self._stats.record(elapsed)
        finally:
            if inflight is not None and not settling:
                inflight.release(headers.event_id, marked=False)
            telemetry.deactivate(token)
            span.end()

    def _context(self, msg: Msg, headers: EventHeaders, ack: AckInfo, span: Any) -> Context:
        """What the handler gets: the event's ids, its attempt, its span and a client."""
        consumer = self._consumer
        return Context(
            self._client,
            service=consumer.service,
            handler=consumer.name,
            subject=msg.subject,  # with the event's key, for a keyed event
            correlation_id=headers.correlation_id,
            causation_id=headers.causation_id,
            event_id=headers.event_id,
            attempt=ack.attempt,
            headers=msg.headers,
            span=span,
        )

    def _claim(
        self, msg: Msg, headers: EventHeaders, ack: AckInfo, delivery: Delivery | None
    ) -> Claim | None:
        """Claim the event id for this delivery if the handler may run: the id is not
        handled yet, nor held by another delivery here, and this delivery is still ours
        (not held past ack_wait). None: the bucket must be asked first (no lookup, or
        one too old to trust). Synchronous: the common case costs no await."""
        inflight = self._inflight
        assert inflight is not None
        seen: bool | None = None
        if delivery is not None:
            if self._expired(msg):
                return Claim.EXPIRED
            fresh = time.monotonic() - delivery.arrived < self._ack_wait / 2
            if fresh and inflight.covers(delivery.marks):
                seen = delivery.seen  # None if screening could not look it up
        if seen:
            return Claim.MARKED
        if seen is None and inflight.holder(headers.event_id) is None:
            return None
        return inflight.claim(headers.event_id, ack.sequence)

    async def _claim_after_look_up(self, headers: EventHeaders, ack: AckInfo) -> Claim:
        """`_claim` once the bucket has said whether the id was handled."""
        assert self._inflight is not None
        if await self._look_up(headers.event_id):
            return Claim.MARKED
        return self._inflight.claim(headers.event_id, ack.sequence)

    async def _skip(self, msg: Msg, claim: Claim, event_id: str, sequence: int) -> None:
        """A delivery whose handler may not run: acked if its id was handled, nak'd if
        another message with its id runs here now (it comes back once that one settled);
        a redelivery of the one running here, or an expired one, is left to the server."""
        assert self._inflight is not None
        if claim is Claim.EXPIRED:
            return
        self.duplicates += 1
        if claim is Claim.MARKED:
            await msg.ack()
        elif self._inflight.holder(event_id) != sequence:
            await msg.nak(delay=self._retry_delay)

    def _expired(self, msg: Msg) -> bool:
        """Held here past ack_wait since the server last heard of it (a pause): the
        server has taken it back, and its redelivery decides who runs it."""
        if time.monotonic() - self._active[id(msg)][1] < self._ack_wait:
            return False
        self.expired += 1
        return True

    async def _look_up(self, event_id: str) -> bool:
        """The marker, asked right before the handler would run."""
        assert self._processed is not None
        began = time.monotonic()
        try:
            seen = await self._processed.seen(event_id)
        except Exception as exc:
            self._health.failed("lookups", str(exc) or type(exc).__name__, since=began)
            raise
        self._health.ok("lookups")
        return seen

    async def _invoke(self, event: Any, ctx: Context) -> None:
        watchdog = self._watchdog
        if watchdog is None:
            await self._signature.invoke(self._handler, event, ctx)
            return
        key, task = watchdog.start()
        try:
            await self._signature.invoke(self._handler, event, ctx)
        except asyncio.CancelledError:
            if watchdog.fired(key, task):
                raise ProcessingTimeExceeded("processing time exceeded") from None
            raise
        finally:
            watchdog.stop(key, task)

    def _span(self, msg: Msg, headers: EventHeaders, ack: AckInfo) -> Any:
        """Child of the producer's span and linked to it: each attempt is its own span."""
        span = telemetry.start_handler_span(
            self._span_name,
            telemetry.SpanKind.CONSUMER,
            self._span_attributes,
            msg.headers,
            link_to_parent=True,
        )
        if span.is_recording():
            span.set_attribute(telemetry.MESSAGE_ID, headers.event_id)
            span.set_attribute(telemetry.CONVERSATION_ID, headers.correlation_id)
            span.set_attribute(telemetry.DELIVERY_ATTEMPT, ack.attempt)
            span.set_attribute(telemetry.STREAM_SEQUENCE, ack.sequence)
        return span
