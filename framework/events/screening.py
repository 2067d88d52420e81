"""Screening and admission for an idempotent subscriber's deliveries.

Screening: the events that arrived in one event-loop iteration (a pull's worth) are
looked up together (which were already handled?), one request instead of a wait per
event, and queue up, looked up and in arrival order. Admission: at most
`max_unsettled` screened events are between hand-over to the workers and settlement
(marker stored, then acked) at once, so what a crash can run twice (handled, marker
not yet stored) stays within `max_unsettled`; the rest wait here, not in parked
workers.

Admission is a counter, not a wait: an event that settles hands the next one waiting
to the worker pool in the same step (`readmit`), so the pipeline refills without a
task switch or an event-loop iteration of its own. One lookup task works through the
arrivals batch by batch, so no task is spawned per pull.
"""

from __future__ import annotations

import time
from collections import deque

import anyio
from nats.aio.msg import Msg

from ..observability.logging import get_logger
from ..transport.dispatch import WorkerPool
from .delivery import Delivery, read_delivery
from .health import Health
from .idempotency import ProcessedIds
from .inflight import InFlight
from .pull import hand_back, hand_back_now

__all__ = ["Screening"]

_log = get_logger("framework.events.subscriber")


class Screening:
    """Arrivals -> one lookup per batch -> admission -> the worker pool, in order."""

    def __init__(
        self,
        processed: ProcessedIds,
        max_unsettled: int,
        *,
        consumer: str,
        inflight: InFlight,
        health: Health,
    ) -> None:
        self._processed = processed
        self._inflight = inflight  # its `marks` stamp each lookup
        self._health = health
        self._limit = max_unsettled
        self._consumer = consumer
        self._arrived: list[Msg] = []  # deliveries not yet taken by the lookup task
        self._ready: deque[Delivery] = deque()  # looked up, waiting for admission
        self._admitted = 0  # screened events handed to the workers, not yet settled
        self._work = anyio.Event()  # set when there are arrivals for the lookup task
        self._looking_up = False
        self._idle = anyio.Event()  # nothing arrived is waiting for its lookup
        self._idle.set()
        self._pool: WorkerPool | None = None
        self._stopping = False

    def start(self, pool: WorkerPool) -> None:
        """Screened deliveries go to `pool`; run `run` in a task until the subscriber stops."""
        self._pool = pool

    async def run(self) -> None:
        """The lookup task: each batch of arrivals, looked up, joins the waiting line."""
        while True:
            if not self._arrived:
                self._work = anyio.Event()
                self._idle.set()
                await self._work.wait()
                continue
            arrived, self._arrived = self._arrived, []
            await self._screen(arrived)

    def stop(self) -> None:
        """What is screened from now on, and what waits for admission, is handed back."""
        self._stopping = True
        waiting, self._ready = self._ready, deque()
        for delivery in waiting:
            hand_back_now(delivery.msg)

    async def wait_handed_over(self) -> None:
        """Until the batches being looked up reached the workers (or were handed back)."""
        await self._idle.wait()

    def arrive(self, msg: Msg) -> None:
        """Take a delivery; those of one loop iteration are looked up together."""
        if self._stopping:
            hand_back_now(msg)
            return
        self._arrived.append(msg)
        if len(self._arrived) == 1:
            self._idle = anyio.Event()
            self._work.set()

    def readmit(self) -> None:
        """One admitted event settled: the next one waiting takes its place."""
        self._admitted -= 1
        if self._ready:
            self._fill()

    async def _screen(self, arrived: list[Msg]) -> None:
        """One lookup of the event ids of a batch of arrivals."""
        screened = [read_delivery(msg) for msg in arrived]
        ids = [d.headers.event_id for d in screened if d.headers is not None]
        marks, began = self._inflight.marks, time.monotonic()
        try:
            seen: set[str] | None = await self._processed.seen_among(ids) if ids else set()
            self._health.ok("lookups")
        except Exception as exc:  # the workers ask again, each for its own event
            _log.warning("idempotency lookup failed", consumer=self._consumer, error=str(exc))
            self._health.failed("lookups", str(exc) or type(exc).__name__, since=began)
            seen = None
        for delivery in screened:
            if self._stopping:  # as on arrival
                await hand_back(delivery.msg)
                continue
            if seen is not None and delivery.headers is not None:
                delivery.seen = delivery.headers.event_id in seen
                delivery.marks = marks
            self._ready.append(delivery)
        self._fill()

    def _fill(self) -> None:
        """Hand waiting events to the workers while fewer than the limit are admitted."""
        pool, ready = self._pool, self._ready
        assert pool is not None
        while ready and self._admitted < self._limit and not self._stopping:
            if not pool.offer(ready[0]):
                return  # the pool is closing (stop hands these back)
            ready.popleft()
            self._admitted += 1
