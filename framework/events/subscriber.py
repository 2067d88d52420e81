"""Durable JetStream subscribers: pull, handle, then ack, retry or dead-letter.

A `Subscriber` wires its parts together and runs their lifecycle (prepare, start,
stop); each part has one job:

- `Consumer` (consumer.py): the durable consumer's name, stream and configuration;
- `Puller` (pull.py): pull requests sized to free capacity, status replies,
  in-progress acks for long handlers;
- `Screening` (screening.py, idempotent subscribers): one lookup per pull of which
  events were already handled, and admission of at most `max_unsettled` of them;
- `Processor` (processing.py): one delivery through the handler, run by a
  `WorkerPool` of `max_concurrency` workers;
- `Outcomes` (outcome.py): nak with backoff, or dead-letter then terminate;
  `Settlement` (settle.py): an idempotent success's marker, then its ack;
- `InFlight` (inflight.py, idempotent subscribers): the event ids this process is
  handling or settling, so a redelivery never runs beside (or just after) the original;
- `Health` (health.py): pulls, lookups and markers that keep failing make a warning,
  `stalled_since` in `$SRV.STATS` and a metric, until they work again.

A delivery travels as the message itself, or, once screened, as a `Delivery`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ..observability import metrics
from ..transport.codec import schema_json
from ..transport.dispatch import WorkerPool
from ..transport.names import event_subject
from ..transport.signature import NO_PAYLOAD, Handler, HandlerSignature
from .consumer import Consumer
from .health import Health
from .idempotency import ProcessedIds
from .inflight import InFlight
from .options import SUBSCRIBE_DEFAULTS, SubscribeOptions
from .outcome import Outcomes
from .processing import Processor
from .pull import Puller
from .screening import Screening

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from ..client import Client

__all__ = ["Subscriber"]

STOP_WAIT = 5.0  # longest wait for deliveries on their way to be handed back


class Subscriber:
    """One durable pull consumer per (service, subscriber), shared by the service's
    replicas; `handler` is the user's function, run for each event."""

    kind = "subscriber"

    def __init__(
        self,
        service: str,
        name: str,
        event_type: str,
        handler: Handler,
        signature: HandlerSignature,
        options: SubscribeOptions = SUBSCRIBE_DEFAULTS,
    ) -> None:
        if signature.payload_type is NO_PAYLOAD:
            raise TypeError(
                f"event handler {handler.__qualname__} must take the event as a parameter"
            )
        self.service = service
        self.name = name
        self.event_type = event_type
        self.handler = handler
        self.signature = signature
        self.options = options
        self.subject = event_subject(event_type)
        self.consumer = Consumer(
            service,
            name,
            event_type,
            self.subject,
            options,
            schema=schema_json(signature.payload_type),
            handler=f"{handler.__module__}:{handler.__qualname__}",
        )
        self._takeover = False  # see `owned_by`
        self.queue_group = self.consumer.durable
        self.stats = metrics.stats_for(service, name, "subscriber")
        self._client: Client | None = None
        self._processed: ProcessedIds | None = None  # idempotent: handled event ids
        self._puller = Puller(self.consumer, self.ensure_consumer)
        self._screening: Screening | None = None
        self._processor: Processor | None = None
        self._pool: WorkerPool | None = None
        self.health = Health(self.consumer.durable)  # replaced on each start

    # -- what discovery and metrics read ---------------------------------------------

    @property
    def durable(self) -> str:
        """The consumer's name, `<service>_<subscriber>`."""
        return self.consumer.durable

    @durable.setter
    def durable(self, value: str) -> None:
        self.consumer.durable = value

    @property
    def stream(self) -> str:
        """The stream the consumer reads (known once prepared)."""
        return self.consumer.stream

    @property
    def pending(self) -> int:
        """Events in the stream not yet delivered to the consumer: its lag."""
        return self.consumer.pending

    @property
    def ack_pending(self) -> int:
        """Events delivered and not yet acknowledged (as of the last `refresh_stats`)."""
        return self.consumer.ack_pending

    @property
    def duplicates(self) -> int:
        """Events skipped since `start` because their id was already handled (or is
        being handled in this process)."""
        return self._processor.duplicates if self._processor is not None else 0

    @property
    def expired(self) -> int:
        """Deliveries dropped unrun since `start`: held here past ack_wait (a pause)."""
        return self._processor.expired if self._processor is not None else 0

    def metadata(self) -> dict[str, str]:
        """What `$SRV.INFO` shows of this subscriber (the CLI's `mesh info` reads it)."""
        return {
            "kind": "subscriber",
            "event_type": self.event_type,
            "stream": self.stream,
            "consumer": self.durable,
            "max_deliver": str(self.options.max_deliver),
            "max_concurrency": str(self.options.max_concurrency),
            "max_unsettled": str(self.options.unsettled_limit),
            "idempotent": str(self.options.idempotent).lower(),
            "event_schema": schema_json(self.signature.payload_type),
        }

    def extra_stats(self) -> dict[str, Any]:
        """The `data` of this subscriber's `$SRV.STATS` entry: lag and outcomes."""
        return {
            "pending": self.pending,
            "ack_pending": self.ack_pending,
            "redelivered": self.stats.redelivered,
            "dead_lettered": self.stats.dead_lettered,
            "duplicates": self.duplicates,
            "expired": self.expired,
            "in_flight": self.stats.in_flight,
            **self.health.stats(),
        }

    async def refresh_stats(self) -> None:
        """Lag and unacknowledged count, from the consumer on the server."""
        if self._client is not None:
            await self.consumer.refresh(self._client.js)

    # -- lifecycle -------------------------------------------------------------------

    def owned_by(self, version: str, *, takeover: bool = False) -> None:
        """The service's version, recorded as the consumer's owner; `takeover`: the next
        `prepare` takes the consumer over whoever set it up (once: a consumer recreated
        later is judged by the ordinary policy, so two takers never flip it back and forth)."""
        self.consumer.version = version
        self._takeover = takeover

    async def ensure_consumer(self, *, takeover: bool = False) -> None:
        """Create or reconcile the durable consumer (`NoStream`, `ConfigConflict`)."""
        assert self._client is not None
        await self.consumer.ensure(self._client, takeover=takeover)

    async def prepare(self, client: Client) -> None:
        """Consumer and idempotency bucket: configuration errors surface here."""
        self._client = client
        self.stats.reset()  # a service served again starts its counts afresh
        self._processor = None
        await self.ensure_consumer(takeover=self._takeover)
        if self.options.idempotent:
            self._processed = await ProcessedIds.open(
                client, self.service, self.name, self.options.idempotency_ttl
            )

    async def start(self, client: Client, task_group: TaskGroup) -> None:
        """Wire the parts, start the workers, subscribe to the inbox and begin pulling."""
        options = self.options
        health = self.health = self._puller.health = Health(self.durable)
        inflight = InFlight() if self._processed is not None else None
        screening = None
        if self._processed is not None and inflight is not None:
            screening = Screening(
                self._processed,
                options.unsettled_limit,
                consumer=self.durable,
                inflight=inflight,
                health=health,
            )
        processor = Processor(
            client,
            self.handler,
            self.signature,
            self.consumer,
            self.stats,
            outcomes=Outcomes(client, self.consumer, self.stats),
            puller=self._puller,
            readmit=screening.readmit if screening is not None else None,
            processed=self._processed,
            task_group=task_group,
            inflight=inflight,
            health=health,
        )
        idempotent = self._processed is not None
        pool = WorkerPool(
            processor.process,
            options.max_concurrency,
            on_idle=processor.flush if idempotent else None,
            # what may wait: screening admits `unsettled_limit`, the puller takes a window
            queue=options.unsettled_limit if idempotent else self._puller.max_window,
        )
        pool.start(task_group)
        if screening is not None:
            screening.start(pool)
            task_group.start_soon(screening.run)
        self._screening, self._processor, self._pool = screening, processor, pool
        arrive = screening.arrive if screening is not None else None
        await self._puller.start(client.nc, pool.offer, arrive)
        task_group.start_soon(self._puller.run)
        metrics.track(self)

    async def stop(self, grace: float) -> bool:
        """Stop pulling; in-flight events finish within `grace` or are redelivered later."""
        metrics.untrack(self)
        if self._screening is not None:
            self._screening.stop()
        await self._puller.stop(min(grace, STOP_WAIT))
        if self._pool is None or self._processor is None:
            return True
        started = time.monotonic()
        if self._screening is not None:
            with anyio.move_on_after(min(grace, STOP_WAIT)):
                # batches being looked up are handed back (nak'd), not dropped
                await self._screening.wait_handed_over()
        finished = await self._pool.close(max(0.0, grace - (time.monotonic() - started)))
        left = max(0.0, grace - (time.monotonic() - started))
        finished = await self._processor.wait_settled(left) and finished
        self._processor.close()
        return finished

    # -- for tests: the flow-control state, settled when nothing is in flight --------

    @property
    def _taken(self) -> int:
        return self._puller.taken

    @property
    def _active(self) -> dict[int, tuple[Msg, float]]:
        return self._puller.active

    @property
    def _deferred(self) -> set[int]:
        return self._processor.deferred if self._processor is not None else set()
