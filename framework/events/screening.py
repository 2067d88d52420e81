"""Screening and admission for an idempotent subscriber's deliveries.

Screening: the events one pull delivered are looked up together (which were already
handled?), one request instead of a wait per event, then handed to the workers in the
order they arrived. Admission: at most `max_concurrency` screened events are between
hand-over and settlement at once, so what a crash can run twice (handled, marker not
yet stored) stays bounded; the rest wait here, looked up and in order, not in parked
workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup
from nats.aio.msg import Msg

from ..observability.logging import get_logger
from .delivery import Delivery, read_delivery
from .health import Health
from .idempotency import ProcessedIds
from .inflight import InFlight
from .pull import hand_back

__all__ = ["Screening"]

_log = get_logger("framework.events.subscriber")


class Screening:
    """Arrivals -> one lookup per batch -> admission -> the worker pool, in order."""

    def __init__(
        self,
        processed: ProcessedIds,
        max_concurrency: int,
        *,
        consumer: str,
        inflight: InFlight,
        health: Health,
    ) -> None:
        self._processed = processed
        self._inflight = inflight  # its `marks` stamp each lookup
        self._health = health
        self._limit = max_concurrency
        self._consumer = consumer
        self._arrived: list[Msg] = []  # deliveries of this loop iteration, to screen
        self._handed_over = anyio.Event()  # the last batch screened reached the workers
        self._handed_over.set()
        self._admitted = 0  # screened events handed to the workers, not yet settled
        self._admissions: anyio.Event | None = None  # set when one of those settles
        self._submit: Callable[[Delivery], Awaitable[None]] | None = None
        self._task_group: TaskGroup | None = None
        self._stopping = False

    def start(self, submit: Callable[[Delivery], Awaitable[None]], task_group: TaskGroup) -> None:
        """Screened deliveries go to `submit`; lookups run in `task_group`."""
        self._submit, self._task_group = submit, task_group

    def stop(self) -> None:
        """What is screened from now on is handed back, not to the workers."""
        self._stopping = True

    async def wait_handed_over(self) -> None:
        """Until the batches being looked up reached the workers (or were handed back)."""
        await self._handed_over.wait()

    def arrive(self, msg: Msg) -> None:
        """Take a delivery; a loop iteration's arrivals are screened together."""
        self._arrived.append(msg)
        if len(self._arrived) == 1:
            asyncio.get_running_loop().call_soon(self._screen)

    def readmit(self) -> None:
        """One admitted event settled: room for the next."""
        self._admitted -= 1
        if self._admissions is not None:
            self._admissions.set()
            self._admissions = None

    def _screen(self) -> None:
        arrived, self._arrived = self._arrived, []
        if arrived and self._task_group is not None:
            previous, self._handed_over = self._handed_over, anyio.Event()
            self._task_group.start_soon(self._screen_batch, arrived, previous, self._handed_over)

    async def _screen_batch(
        self, arrived: list[Msg], previous: anyio.Event, done: anyio.Event
    ) -> None:
        """One lookup of the event ids a pull delivered, instead of a wait per event.

        Lookups of successive batches overlap; their events reach the workers in the
        order they arrived (`previous` is set once the batch before is handed over).
        """
        try:
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
            await previous.wait()
            await self._hand_over(screened, seen, marks)
        finally:
            done.set()

    async def _hand_over(self, screened: list[Delivery], seen: set[str] | None, marks: int) -> None:
        assert self._submit is not None
        for delivery in screened:
            if self._stopping:  # as on arrival
                await hand_back(delivery.msg)
                continue
            if seen is not None and delivery.headers is not None:
                delivery.seen = delivery.headers.event_id in seen
                delivery.marks = marks
            await self._admit()
            await self._submit(delivery)

    async def _admit(self) -> None:
        """Wait for room among the `max_concurrency` admitted events."""
        while self._admitted >= self._limit:
            if self._admissions is None:
                self._admissions = anyio.Event()
            await self._admissions.wait()
        self._admitted += 1
