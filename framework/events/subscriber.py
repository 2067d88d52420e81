"""Durable JetStream subscribers: pull, handle, then ack, retry or dead-letter.

A subscriber pulls with its own requests (not nats-py's `fetch`, which spawns a task
per message): each pull asks for exactly the capacity that is free, so a slow handler
never over-fetches into ack timeouts and redelivery storms. Outcomes: success acks;
an exception naks with the backoff delay of that attempt; the last attempt, an
undecodable payload or `Reject` copy the message to the dead-letter stream and
terminate it. Long handlers keep their messages alive with in-progress acks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup
from nats.errors import Error as NatsError
from nats.js import api
from nats.js.errors import NotFoundError

from ..context import Context
from ..errors import (
    BadRequest,
    ConfigConflict,
    NoStream,
    PublishError,
    Reject,
)
from ..observability import metrics
from ..observability import tracing as telemetry
from ..streams import differences
from ..transport import headers as h
from ..transport.codec import DECODE_ERRORS, decoder_for, schema_json
from ..transport.dispatch import WorkerPool
from ..transport.names import event_subject
from ..transport.signature import NO_PAYLOAD, Handler, HandlerSignature
from .deadletter import REPLAY_OF, send_to_dead_letter
from .idempotency import DEFAULT_TTL, ProcessedIds
from .settle import Settlement
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["DEFAULT_BACKOFF", "Subscriber", "ack_fields", "read_event_headers"]

_log = structlog.get_logger("framework.events.subscriber")


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


class _Screened:
    """A delivery read on arrival, with whether its event id was already handled
    (None: not known, the worker asks)."""

    __slots__ = ("fields", "info", "msg", "seen")

    def __init__(
        self,
        msg: Any,
        fields: tuple[str, int, int, int],
        info: EventHeaders | None,
        seen: bool | None = None,
    ) -> None:
        self.msg = msg
        self.fields = fields
        self.info = info
        self.seen = seen


class EventHeaders(msgspec.Struct):
    event_id: str
    correlation_id: str
    causation_id: str | None


def read_event_headers(headers: Mapping[str, str] | None, fallback_id: str) -> EventHeaders:
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


DEFAULT_BACKOFF = (1.0, 5.0, 15.0, 60.0)
PULL_EXPIRES = 10.0
PULL_HEARTBEAT = 2.0


class Subscriber:
    """One durable pull consumer per (service, handler), shared by the service's replicas."""

    kind = "subscriber"

    def __init__(
        self,
        service: str,
        name: str,
        event_type: str,
        fn: Handler,
        signature: HandlerSignature,
        *,
        max_deliver: int = 5,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        ack_wait: float = 30.0,
        max_concurrency: int = 16,
        max_processing_time: float | None = 300.0,
        deliver: str = "all",
        idempotent: bool = True,
        idempotency_ttl: float = DEFAULT_TTL,
        dead_letter: bool = True,
        ordered_by: Callable[[Any], Hashable] | None = None,
        max_ack_pending: int | None = None,
    ) -> None:
        if signature.payload_type is NO_PAYLOAD:
            raise TypeError(f"event handler {fn.__qualname__} must take the event as a parameter")
        if max_deliver < 1 or max_concurrency < 1:
            raise ValueError("max_deliver and max_concurrency must be at least 1")
        if deliver not in ("all", "new"):
            raise ValueError("deliver must be 'all' or 'new'")
        self.service = service
        self.name = name
        self.event_type = event_type
        self.fn = fn
        self.signature = signature
        self.subject = event_subject(event_type)
        self.durable = f"{service}_{name}"
        self.queue_group = self.durable
        self.max_deliver = max_deliver
        self.backoff = tuple(backoff) or (0.0,)
        self.ack_wait = ack_wait
        self.max_concurrency = max_concurrency
        self.max_processing_time = max_processing_time
        self.deliver = deliver
        self.idempotent = idempotent
        self.idempotency_ttl = idempotency_ttl
        self.dead_letter = dead_letter
        self.ordered_by = ordered_by
        self.max_ack_pending = max_ack_pending or max(1000, 4 * max_concurrency)
        self.stats = metrics.stats_for(service, name, "subscriber")
        self._span_name = f"process {self.subject}"
        self._span_attributes = telemetry.handler_attributes(service, self.subject, self.durable)
        self.duplicates = 0
        self.pending = 0
        self._lag_sequence = 0
        self.ack_pending = 0
        self.stream = ""
        self._decoder = decoder_for(signature.payload_type)
        self._client: Client | None = None
        self._pool: WorkerPool | None = None
        self._watchdog: Watchdog | None = None  # max_processing_time, one timer for all
        self._processed: ProcessedIds | None = None
        self._locks = _KeyLocks()
        self._sub: Any = None
        self._inbox = ""
        self._capacity = 2 * max_concurrency  # in flight plus one batch waiting
        self._taken = 0  # delivered to us and not yet settled
        self._outstanding = 0  # asked for and not yet delivered or expired
        self._wake: anyio.Event | None = None
        self._last_activity = 0.0
        self._reconnects = -1
        self._active: dict[int, tuple[Any, float]] = {}
        self._arrived: list[Any] = []  # deliveries of this loop iteration, to screen
        self._screened = anyio.Event()
        self._settlement: Settlement | None = None  # idempotent: mark, then ack
        self._deferred: set[int] = set()  # handled, in the settlement's hands
        self._admitted = 0  # screened events handed to the workers, not yet settled
        self._admissions: anyio.Event | None = None  # set when one of those settles
        self._task_group: TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._pending_check: Callable[[], Awaitable[None]] | None = None
        self._stopping = False

    # -- discovery -------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {
            "kind": "subscriber",
            "event_type": self.event_type,
            "stream": self.stream,
            "consumer": self.durable,
            "max_deliver": str(self.max_deliver),
            "max_concurrency": str(self.max_concurrency),
            "idempotent": str(self.idempotent).lower(),
            "event_schema": schema_json(self.signature.payload_type),
        }

    def extra_stats(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "ack_pending": self.ack_pending,
            "redelivered": self.stats.redelivered,
            "dead_lettered": self.stats.dead_lettered,
            "duplicates": self.duplicates,
            "in_flight": self.stats.in_flight,
        }

    # -- lifecycle -------------------------------------------------------------------

    def consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            description=f"{self.service}.{self.name} handles {self.event_type}",
            # unkeyed and keyed (`events.<type>.<key>`) events of the type alike
            filter_subjects=[self.subject, f"{self.subject}.>"],
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL
            if self.deliver == "all"
            else api.DeliverPolicy.NEW,
            ack_wait=self.ack_wait,
            # one more than ours: an attempt that crashed the process is dead-lettered next
            max_deliver=self.max_deliver + 1,
            max_ack_pending=self.max_ack_pending,
            max_waiting=512,
        )

    async def ensure_consumer(self) -> None:
        assert self._client is not None
        js = self._client.js
        if not self.stream:
            try:
                self.stream = await js.find_stream_name_by_subject(self.subject)
            except NotFoundError:
                raise NoStream(f"no stream captures {self.subject}") from None
        declared = self.consumer_config()
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            await js.add_consumer(self.stream, declared)
            return
        await self._reconcile(info.config, declared)

    async def _reconcile(self, existing: api.ConsumerConfig, declared: api.ConsumerConfig) -> None:
        """Fixed fields must match; tunables are updated, and the change is logged."""
        fixed = {"deliver_policy", "ack_policy", "filter_subjects"}
        tunable = {"ack_wait", "max_deliver", "max_ack_pending"}
        if existing.filter_subject == self.subject and not existing.filter_subjects:
            # made before event keys existed: it gains the keyed subjects, nothing else
            existing = replace(existing, filter_subject=None, filter_subjects=[self.subject])
            tunable.add("filter_subjects")
        diff = differences(existing, declared, sorted(fixed | tunable))
        conflicts = {k: v for k, v in diff.items() if k in fixed - tunable}
        if conflicts:
            raise ConfigConflict(f"consumer {self.stream}/{self.durable}", conflicts)
        if diff:
            assert self._client is not None
            await self._client.js.add_consumer(self.stream, declared)
            _log.warning(
                "consumer config updated",
                consumer=self.durable,
                changes={k: {"was": a, "now": b} for k, (a, b) in diff.items()},
            )

    async def prepare(self, client: Client) -> None:
        """Consumer and idempotency bucket: configuration errors surface here."""
        self._client = client
        self.stats.reset()  # a service served again starts its counts afresh
        self.duplicates = 0
        await self.ensure_consumer()
        if self.idempotent:
            self._processed = await ProcessedIds.open(
                client, self.service, self.name, self.idempotency_ttl
            )

    async def refresh_stats(self) -> None:
        """Lag from the consumer itself: what the stream holds that we have not taken."""
        if self._client is None or not self.stream:
            return
        info = await self._client.js.consumer_info(self.stream, self.durable, timeout=0.5)
        self.pending = info.num_pending or 0
        self.ack_pending = info.num_ack_pending or 0

    async def start(self, client: Client, task_group: TaskGroup) -> None:
        self._scope = anyio.CancelScope()
        self._stopping = False
        self._wake = anyio.Event()
        self._taken = self._outstanding = 0
        self._pool = WorkerPool(self._handle, self.max_concurrency)
        self._pool.start(task_group)
        self._task_group = task_group
        self._arrived, self._deferred = [], set()
        self._admitted, self._admissions = 0, None
        self._screened = anyio.Event()  # the last batch screened was handed over
        self._screened.set()
        if self._processed is not None:
            self._settlement = Settlement(
                self._processed,
                task_group,
                self._settled,
                consumer=self.durable,
                give_up_after=self.max_processing_time or 60.0,
                nak_delay=self.backoff[0],
            )
        if self.max_processing_time is not None:
            self._watchdog = Watchdog(self.max_processing_time)
        self._inbox = client.nc.new_inbox()
        self._sub = await client.nc.subscribe(self._inbox, cb=self._on_delivery)
        task_group.start_soon(self._run_loops)
        metrics.track(self)

    async def _run_loops(self) -> None:
        assert self._scope is not None
        with self._scope:
            async with anyio.create_task_group() as loops:
                loops.start_soon(self._pull_loop)
                loops.start_soon(self._keep_alive_loop)

    async def stop(self, grace: float) -> bool:
        """Stop pulling; in-flight events finish within `grace` or are redelivered later."""
        metrics.untrack(self)
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        if self._sub is not None:
            # drain, not unsubscribe: what is already on its way is handed back (nak)
            # for another replica now, instead of waiting out ack_wait
            with anyio.move_on_after(min(grace, 5.0)), contextlib.suppress(Exception):
                await self._sub.drain()
        if self._pool is None:
            return True
        started = time.monotonic()
        with anyio.move_on_after(min(grace, 5.0)):
            await self._screened.wait()  # batches being looked up are nak'd, not dropped
        finished = await self._pool.close(max(0.0, grace - (time.monotonic() - started)))
        if self._settlement is not None:
            left = max(0.0, grace - (time.monotonic() - started))
            finished = await self._settlement.wait(left) and finished
        if self._watchdog is not None:
            self._watchdog.close()
        return finished

    # -- pulling ---------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        assert self._client is not None
        nc = self._client.nc
        pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        self._last_activity = time.monotonic()
        while True:
            self._wake = anyio.Event()
            self._check_stale(nc)
            free = self._capacity - self._taken - self._outstanding
            if free >= max(1, self.max_concurrency // 2) and nc.is_connected:
                request = {
                    "batch": free,
                    "expires": int(PULL_EXPIRES * 1e9),
                    "idle_heartbeat": int(PULL_HEARTBEAT * 1e9),
                }
                try:
                    await nc.publish(pull_subject, json.dumps(request).encode(), reply=self._inbox)
                    self._outstanding += free
                except Exception as exc:
                    _log.warning("pull request failed", consumer=self.durable, error=str(exc))
            with anyio.move_on_after(PULL_HEARTBEAT / 2):
                await self._wake.wait()

    def _wake_puller(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _check_stale(self, nc: Any) -> None:
        """Pull requests die with a connection or a server; forget them and ask again."""
        reconnects = nc.stats.get("reconnects", 0)
        silent = time.monotonic() - self._last_activity > 2.5 * PULL_HEARTBEAT
        if reconnects != self._reconnects or (silent and self._outstanding):
            self._reconnects = reconnects
            self._outstanding = 0
            self._last_activity = time.monotonic()
            if silent:
                self._schedule_consumer_check()

    def _schedule_consumer_check(self) -> None:
        """A consumer lost with a server's state is recreated (best effort, logged)."""

        async def check() -> None:
            try:
                await self.ensure_consumer()
            except Exception as exc:
                _log.warning("consumer check failed", consumer=self.durable, error=str(exc))

        self._pending_check = check

    async def _on_delivery(self, msg: Any) -> None:
        self._last_activity = time.monotonic()
        if not msg.reply:
            self._on_status(msg)
            return
        self._outstanding = max(0, self._outstanding - 1)
        if self._stopping:
            await _hand_back(msg)
            return
        self._taken += 1
        if self._processed is not None:  # looked up together, then handed to the workers
            self._arrived.append(msg)
            if len(self._arrived) == 1:
                asyncio.get_running_loop().call_soon(self._screen)
            return
        assert self._pool is not None
        await self._pool.submit(msg)

    def _screen(self) -> None:
        arrived, self._arrived = self._arrived, []
        if arrived and self._task_group is not None:
            previous, self._screened = self._screened, anyio.Event()
            self._task_group.start_soon(self._screen_batch, arrived, previous, self._screened)

    async def _screen_batch(
        self, arrived: list[Any], previous: anyio.Event, done: anyio.Event
    ) -> None:
        """One lookup of the event ids a pull delivered, instead of a wait per event.

        Lookups of successive batches overlap; their events reach the workers in the
        order they arrived (`previous` is set once the batch before is handed over).
        """
        assert self._processed is not None and self._pool is not None
        try:
            screened = [self._read(msg) for msg in arrived]
            ids = [s.info.event_id for s in screened if s.info is not None]
            try:
                seen: set[str] | None = await self._processed.seen_among(ids) if ids else set()
            except Exception as exc:  # the workers ask again, each for its own event
                _log.warning("idempotency lookup failed", consumer=self.durable, error=str(exc))
                seen = None
            await previous.wait()
            await self._hand_over(screened, seen)
        finally:
            done.set()

    async def _hand_over(self, screened: list[_Screened], seen: set[str] | None) -> None:
        assert self._pool is not None
        for item in screened:
            if self._stopping:  # as on arrival
                await _hand_back(item.msg)
                continue
            if seen is not None and item.info is not None:
                item.seen = item.info.event_id in seen
            await self._admit()
            await self._pool.submit(item)

    def _read(self, msg: Any) -> _Screened:
        fields = _fields(msg)
        try:
            info: EventHeaders | None = read_event_headers(msg.headers, f"{fields[0]}-{fields[2]}")
        except BadRequest:
            info = None  # the worker reads them again and dead-letters the event
        return _Screened(msg, fields, info)

    def _on_status(self, msg: Any) -> None:
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return
        if status in ("404", "408", "409"):
            try:
                unfilled = int(headers.get("Nats-Pending-Messages", "0"))
            except ValueError:
                unfilled = 0
            self._outstanding = max(0, self._outstanding - unfilled)
            description = headers.get("Description", "")
            if status == "409" and "Consumer Deleted" in description:
                self._outstanding = 0
                self._schedule_consumer_check()
            elif status == "409" and "Exceeded MaxWaiting" not in description:
                _log.info(
                    "pull ended", consumer=self.durable, status=status, description=description
                )
            self._wake_puller()

    async def _keep_alive_loop(self) -> None:
        """In-progress acks for long handlers (a third of ack_wait), deferred consumer checks."""
        every = max(0.1, self.ack_wait / 3)
        while True:
            await anyio.sleep(every / 2)
            check, self._pending_check = self._pending_check, None
            if check is not None:
                await check()
            now = time.monotonic()
            for key, (msg, touched) in list(self._active.items()):
                if now - touched >= every and key in self._active:
                    self._active[key] = (msg, now)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    # -- handling --------------------------------------------------------------------

    async def _handle(self, item: Any) -> None:
        screened = item if type(item) is _Screened else None
        msg = item if screened is None else screened.msg
        key = id(msg)
        self._active[key] = (msg, time.monotonic())
        self.stats.in_flight += 1
        try:
            await self._process(msg, screened)
        except Exception as exc:  # never lose the worker; hand the event back for a retry
            if isinstance(exc, NatsError | TimeoutError | OSError):
                _log.warning(
                    "event deferred: NATS unavailable", consumer=self.durable, error=str(exc)
                )
            else:
                _log.error(
                    "event settlement failed", consumer=self.durable, error=str(exc), exc_info=exc
                )
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.backoff[0])
        finally:
            self.stats.in_flight -= 1
            if key not in self._deferred:
                self._release(key)
                if screened is not None:
                    self._readmit()

    def _release(self, key: int) -> None:
        del self._active[key]
        self._taken -= 1
        self._wake_puller()

    def _settled(self, msg: Any, elapsed_ns: int | None) -> None:
        """The settlement acked (`elapsed_ns` is the handler's time) or nak'd the event."""
        if elapsed_ns is not None:
            self.stats.record(elapsed_ns)
        key = id(msg)
        self._deferred.discard(key)
        self._release(key)
        self._readmit()

    async def _admit(self) -> None:
        """At most `max_concurrency` screened events between hand-over and settlement,
        so what a crash can run twice (handled, marker not yet stored) stays bounded by
        it; the rest wait here, looked up and in order, not in parked workers."""
        while self._admitted >= self.max_concurrency:
            if self._admissions is None:
                self._admissions = anyio.Event()
            await self._admissions.wait()
        self._admitted += 1

    def _readmit(self) -> None:
        self._admitted -= 1
        if self._admissions is not None:
            self._admissions.set()
            self._admissions = None

    async def _process(self, msg: Any, screened: _Screened | None) -> None:
        fields = screened.fields if screened is not None else _fields(msg)
        stream, attempt, sequence, pending = fields
        if sequence > self._lag_sequence:  # lag as of the newest delivery
            self._lag_sequence, self.pending = sequence, pending
        if attempt > 1:
            self.stats.redelivered += 1
        info = screened.info if screened is not None else None
        if info is None:
            try:
                info = read_event_headers(msg.headers, f"{stream}-{sequence}")
            except BadRequest as exc:
                return await self._dead_letter(
                    msg, "invalid_headers", exc.message, attempt, sequence, "-"
                )
        seen = screened.seen if screened is not None else None
        if attempt > self.max_deliver:
            return await self._dead_letter(
                msg,
                "max_deliver",
                "the previous attempt did not finish",
                attempt,
                sequence,
                info.event_id,
            )
        try:
            event = self._decoder.decode(msg.data)
        except DECODE_ERRORS as exc:
            self.stats.record(0, f"undecodable: {exc}")
            return await self._dead_letter(
                msg, "undecodable", str(exc), attempt, sequence, info.event_id
            )
        if self.ordered_by is None:
            return await self._run(msg, event, info, attempt, sequence, seen)
        try:
            key = self.ordered_by(event)
            hash(key)
        except Exception as exc:  # retrying cannot change the key: a poison event
            error = f"ordered_by failed: {_describe(exc)}"
            self.stats.record(0, error)
            return await self._dead_letter(
                msg, "invalid_key", error, attempt, sequence, info.event_id
            )
        async with self._locks.hold(key):
            return await self._run(msg, event, info, attempt, sequence, seen)

    async def _run(
        self,
        msg: Any,
        event: Any,
        info: EventHeaders,
        attempt: int,
        sequence: int,
        seen: bool | None,
    ) -> None:
        if self._processed is not None:
            if seen is None:
                seen = await self._processed.seen(info.event_id)
            if seen:
                self.duplicates += 1
                await msg.ack()
                return
        started = time.perf_counter_ns()
        span = self._span(msg, info, attempt, sequence)
        ctx = Context(
            self._client,  # type: ignore[arg-type]
            service=self.service,
            handler=self.name,
            subject=self.subject,
            correlation_id=info.correlation_id,
            causation_id=info.causation_id,
            event_id=info.event_id,
            attempt=attempt,
            headers=msg.headers,
            span=span,
        )
        token = telemetry.activate(span)  # user code and ctx.call/publish nest under it
        try:
            await self._invoke(event, ctx)
        except Reject as exc:
            telemetry.record_error(span, exc)
            self.stats.record(time.perf_counter_ns() - started, f"rejected: {exc.reason}")
            await self._dead_letter(msg, "rejected", exc.reason, attempt, sequence, info.event_id)
        except Exception as exc:
            telemetry.record_error(span, exc)
            error = _describe(exc)
            self.stats.record(time.perf_counter_ns() - started, error)
            await self._failed(msg, exc, error, ctx, attempt, sequence)
        else:
            elapsed = time.perf_counter_ns() - started
            if self._settlement is not None:  # acked once the marker is stored
                self._deferred.add(id(msg))
                self._settlement.add(msg, info.event_id, elapsed)
            else:
                await msg.ack()
                self.stats.record(elapsed)
        finally:
            telemetry.deactivate(token)
            span.end()

    async def _invoke(self, event: Any, ctx: Context) -> None:
        watchdog = self._watchdog
        if watchdog is None:
            await self.signature.invoke(self.fn, event, ctx)
            return
        key, task = watchdog.start()
        try:
            await self.signature.invoke(self.fn, event, ctx)
        except asyncio.CancelledError:
            if watchdog.fired(key, task):
                raise ProcessingTimeExceeded("processing time exceeded") from None
            raise
        finally:
            watchdog.stop(key, task)

    def _span(self, msg: Any, info: EventHeaders, attempt: int, sequence: int) -> Any:
        """Child of the producer's span and linked to it: each attempt is its own span."""
        span = telemetry.start_handler_span(
            self._span_name,
            telemetry.SpanKind.CONSUMER,
            self._span_attributes,
            msg.headers,
            link_to_parent=True,
        )
        if span.is_recording():
            span.set_attribute(telemetry.MESSAGE_ID, info.event_id)
            span.set_attribute(telemetry.CONVERSATION_ID, info.correlation_id)
            span.set_attribute(telemetry.DELIVERY_ATTEMPT, attempt)
            span.set_attribute(telemetry.STREAM_SEQUENCE, sequence)
        return span

    async def _failed(
        self, msg: Any, exc: Exception, error: str, ctx: Context, attempt: int, sequence: int
    ) -> None:
        if attempt >= self.max_deliver:
            ctx.log.error("event handler failed, last attempt", error=error, exc_info=exc)
            await self._dead_letter(
                msg, "max_deliver", error, attempt, sequence, ctx.event_id or "-"
            )
            return
        delay = self.backoff[min(attempt - 1, len(self.backoff) - 1)]
        ctx.log.warning("event handler failed, will retry", error=error, retry_in=delay)
        await msg.nak(delay=delay)

    async def _dead_letter(
        self, msg: Any, reason: str, error: str, attempt: int, sequence: int, event_id: str
    ) -> None:
        assert self._client is not None
        if self.dead_letter:
            try:
                await send_to_dead_letter(
                    self._client,
                    service=self.service,
                    handler=self.name,
                    reason=reason,
                    error=error,
                    attempts=attempt,
                    subject=msg.subject,
                    stream=self.stream,
                    sequence=sequence,
                    event_id=event_id,
                    data=msg.data,
                    original_headers=msg.headers,
                )
            except PublishError as exc:  # keep the original: it comes back later
                _log.error(
                    "dead letter not stored, will retry", consumer=self.durable, error=str(exc)
                )
                await msg.nak(delay=self.backoff[-1])
                return
        self.stats.dead_lettered += 1
        _log.error(
            "event dead-lettered",
            service=self.service,
            handler=self.name,
            reason=reason,
            error=error,
            attempt=attempt,
            event_id=event_id,
            stream_sequence=sequence,
        )
        await msg.term()


async def _hand_back(msg: Any) -> None:
    """A stopping replica naks what it will not handle: another one takes it now,
    instead of after ack_wait."""
    with contextlib.suppress(Exception):
        await msg.nak()


def _fields(msg: Any) -> tuple[str, int, int, int]:
    fields = ack_fields(msg.reply)
    if fields is None:
        meta = msg.metadata
        fields = (meta.stream, meta.num_delivered, meta.sequence.stream, meta.num_pending)
    return fields


def ack_fields(reply: str) -> tuple[str, int, int, int] | None:
    """Stream, delivery attempt, stream sequence and pending count from an ack subject.

    nats-py's `msg.metadata` builds dataclasses and a datetime per message; one split
    is a quarter of the cost. `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.
    <ts>.<pending>` (9 tokens), or the form with domain and account hash (11 or 12).
    """
    tokens = reply.split(".")
    at = {9: 2, 11: 4, 12: 4}.get(len(tokens))
    if at is None:
        return None
    try:
        return tokens[at], int(tokens[at + 2]), int(tokens[at + 3]), int(tokens[at + 6])
    except ValueError:
        return None


class ProcessingTimeExceeded(TimeoutError):
    """A handler ran past `max_processing_time` and was cancelled: a failed attempt."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProcessingTimeExceeded):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
