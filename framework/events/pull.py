"""Pulling with flow control: ask the consumer for exactly the capacity that is free.

nats-py's `fetch` spawns a task per message and asks for a fixed batch; here each pull
request (to the subscriber's own inbox) asks for what the subscriber can take, so a
slow handler never over-fetches into ack timeouts and redelivery storms. The puller
also reads the server's status replies (a pull that expired, a deleted consumer, idle
heartbeats), notices pulls lost with a connection, and keeps long handlers' messages
alive with in-progress acks.

The window (what may be taken and not yet settled) is not tied to `max_concurrency`:
it follows the rate at which events settle, at least twice `max_concurrency` (the
handlers plus one batch waiting) and at most `MAX_WINDOW`. A plain subscriber takes
about `PLAIN_WINDOW_SECONDS` of its rate ahead: a slow handler still gets only what it
will start soon (1 ms handlers, 4 workers: 8), while no-op handlers are not held up by
pull round trips. An idempotent subscriber's waiting events sit in screening, looked
up but not admitted (so they do not count toward what a crash can run twice), and it
takes `WINDOW_SECONDS` ahead: big lookups and pulls. Deliveries are taken as nats-py
reads them (no queue and task per message): screening only appends them, a plain
subscriber's worker pool, which holds a whole window, only queues them.

Pulls the server leaves unanswered (no message, status or heartbeat for `2.5 *
PULL_HEARTBEAT` seconds after a pull) and pull requests or consumer checks that fail
are reported to the subscriber's `Health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import anyio
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..observability.logging import get_logger
from ..transport import wire
from .consumer import Consumer
from .health import Health

__all__ = [
    "MAX_WINDOW",
    "PLAIN_WINDOW_SECONDS",
    "PULL_EXPIRES",
    "PULL_HEARTBEAT",
    "WINDOW_SECONDS",
    "Puller",
    "hand_back",
    "hand_back_now",
]

_log = get_logger("framework.events.subscriber")
_NAK = b"-NAK"

PULL_EXPIRES = 10.0  # seconds a pull request waits on the server for messages
PULL_HEARTBEAT = 2.0  # seconds between the server's idle heartbeats to a waiting pull
MAX_WINDOW = 256  # an idempotent subscriber's largest window: one batched lookup's worth
WINDOW_SECONDS = 0.1  # an idempotent subscriber takes about this long's worth of events
PLAIN_WINDOW_SECONDS = 0.002  # a plain one: what it starts soon (its waiting is not screened)
_RATE_EVERY = 0.2  # seconds between estimates of the settle rate

Offer = Callable[[Msg], bool]  # to the worker pool, without waiting: False when it is full
Arrive = Callable[[Msg], None]  # to screening, which looks a pull's events up together


class Puller:
    """Pull requests, deliveries and status replies of one subscriber's inbox.

    `taken` counts deliveries not yet settled (the workers call `release`); `active`
    holds those being handled, for their in-progress acks.
    """

    def __init__(self, consumer: Consumer, check_consumer: Callable[[], Awaitable[None]]) -> None:
        """`check_consumer` recreates the consumer if a server lost it."""
        max_concurrency = consumer.options.max_concurrency
        self._consumer = consumer
        self._base = 2 * max_concurrency  # in flight plus one batch waiting
        self._capacity = self._base
        self._window_seconds = WINDOW_SECONDS  # of settled events the window holds
        self._settled = 0  # releases so far, for the rate
        self._rate_at = (0.0, 0)  # (monotonic time, releases) of the last estimate
        self._keep_alive_every = max(0.1, consumer.options.ack_wait / 3)
        self._check_consumer = check_consumer
        self.taken = 0  # delivered to us and not yet settled
        self._outstanding = 0  # asked for and not yet delivered or expired
        self.active: dict[int, tuple[Msg, float]] = {}  # id(msg): (msg, last in-progress ack)
        self._nc: NATS | None = None
        self._sub: Subscription | None = None
        self._inbox = ""
        self._offer: Offer | None = None
        self._arrive: Arrive | None = None
        self._wake: anyio.Event | None = None
        self._last_activity = 0.0
        self._heard_at = 0.0  # the last message of any kind on the inbox
        self._pulled_at = 0.0  # the last pull request sent
        self._pulls_failing = False
        self.health = Health(consumer.durable)  # the subscriber's, set on its start
        self._reconnects = -1
        self._consumer_check_due = False
        self._scope: anyio.CancelScope | None = None  # built in `start`: it needs a loop
        self._stopping = False

    async def start(self, nc: NATS, offer: Offer, arrive: Arrive | None) -> None:
        """Subscribe to the inbox; deliveries are taken as nats-py reads them (no queue
        and task per message) and go to `arrive` when given, else to `offer`, which must
        hold a whole window (one refused, which a lost-and-resent pull could cause, is
        handed back)."""
        self._nc, self._offer, self._arrive = nc, offer, arrive
        self._scope = anyio.CancelScope()
        self._stopping = False
        self._wake = anyio.Event()
        self.taken = self._outstanding = 0
        self._capacity = self._base
        self._window_seconds = WINDOW_SECONDS if arrive is not None else PLAIN_WINDOW_SECONDS
        self._settled, self._rate_at = 0, (time.monotonic(), 0)
        self._inbox = nc.new_inbox()
        self._sub = await wire.subscribe_inline(nc, self._inbox, self._on_arrival)

    async def run(self) -> None:
        """Pull and keep alive until `stop`."""
        assert self._scope is not None, "started"
        with self._scope:
            async with anyio.create_task_group() as loops:
                loops.start_soon(self._pull_loop)
                loops.start_soon(self._keep_alive_loop)

    async def stop(self, timeout: float) -> None:
        """Stop pulling; what is already on its way is handed back, for another replica."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        if self._sub is not None:
            # drain, not unsubscribe: what is already on its way is handed back (nak)
            # for another replica now, instead of waiting out ack_wait
            with anyio.move_on_after(timeout), contextlib.suppress(Exception):
                await self._sub.drain()  # type: ignore[no-untyped-call]

    @property
    def max_window(self) -> int:
        """The most deliveries taken and not yet settled at once."""
        return max(self._base, MAX_WINDOW)

    def release(self, key: int) -> None:
        """The delivery `key` (its `id`) is settled: room for another (the pull loop
        asks for it one step later, behind the acks and markers being sent)."""
        del self.active[key]
        self.taken -= 1
        self._settled += 1
        self._resize()
        if self._wake is not None:
            self._wake.set()

    def _pull_request(self, batch: int) -> bytes:
        """A pull for `batch` messages, expiring after `PULL_EXPIRES`, with heartbeats."""
        return (
            f'{{"batch":{batch},"expires":{int(PULL_EXPIRES * 1e9)},'
            f'"idle_heartbeat":{int(PULL_HEARTBEAT * 1e9)}}}'
        ).encode()

    def _on_arrival(self, msg: Msg) -> None:
        """A delivery or status, as nats-py reads it (screening only queues it)."""
        self._heard()
        if not msg.reply:
            self._on_status(msg)
            return
        self._outstanding = max(0, self._outstanding - 1)
        if self._stopping:
            hand_back_now(msg)
            return
        self.taken += 1
        if self._arrive is not None:
            self._arrive(msg)
            return
        assert self._offer is not None
        if not self._offer(msg):
            self.taken -= 1
            hand_back_now(msg)

    def _heard(self) -> None:
        """Something arrived on the inbox: the server answers our pulls."""
        self._last_activity = self._heard_at = time.monotonic()
        if self._pulls_failing:
            self._pulls_failing = False
            self.health.ok("pulls")

    async def _pull_loop(self) -> None:
        nc = self._nc
        assert nc is not None
        pull_subject = self._consumer.pull_subject
        self._last_activity = self._heard_at = time.monotonic()
        while True:
            self._wake = anyio.Event()
            self._check_stale(nc)
            self._check_health()
            self._resize()
            free = self._capacity - self.taken - self._outstanding
            if free >= max(1, self._capacity // 4) and nc.is_connected:
                try:
                    await nc.publish(pull_subject, self._pull_request(free), reply=self._inbox)
                    self._outstanding += free
                    self._pulled_at = time.monotonic()
                except Exception as exc:
                    _log.warning(
                        "pull request failed", consumer=self._consumer.durable, error=str(exc)
                    )
                    self._pull_failed(f"pull request failed: {exc}")
            with anyio.move_on_after(PULL_HEARTBEAT / 2):
                await self._wake.wait()

    def _resize(self) -> None:
        """The window: `WINDOW_SECONDS` (idempotent) or `PLAIN_WINDOW_SECONDS` (plain)
        of the settle rate, at least twice `max_concurrency`, at most `MAX_WINDOW`."""
        now = time.monotonic()
        since, settled = self._rate_at
        if now - since < _RATE_EVERY:
            return
        rate = (self._settled - settled) / (now - since)
        self._rate_at = (now, self._settled)
        self._capacity = max(self._base, min(MAX_WINDOW, int(rate * self._window_seconds)))

    def _check_health(self) -> None:
        """A pull sent and nothing heard since, for longer than a heartbeat allows."""
        silence = time.monotonic() - self._heard_at
        if self._pulled_at > self._heard_at and silence > 2.5 * PULL_HEARTBEAT:
            self._pull_failed(
                f"no message or heartbeat from the server for {silence:.0f} s after a pull",
                since=self._heard_at,
            )
        self.health.check()

    def _pull_failed(self, cause: str, since: float | None = None) -> None:
        self._pulls_failing = True
        self.health.failed("pulls", cause, since=since)

    def _check_stale(self, nc: NATS) -> None:
        """Pull requests die with a connection or a server; forget them and ask again."""
        reconnects = nc.stats.get("reconnects", 0)
        silent = time.monotonic() - self._last_activity > 2.5 * PULL_HEARTBEAT
        if reconnects != self._reconnects or (silent and self._outstanding):
            self._reconnects = reconnects
            self._outstanding = 0
            self._last_activity = time.monotonic()
            if silent:
                self._consumer_check_due = True  # lost with a server's state? recreated

    def _on_status(self, msg: Msg) -> None:
        """A pull's end (404/408/409, with what it left unfilled) or a heartbeat (100)."""
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status not in ("404", "408", "409"):
            return
        try:
            unfilled = int(headers.get("Nats-Pending-Messages", "0"))
        except ValueError:
            unfilled = 0
        self._outstanding = max(0, self._outstanding - unfilled)
        description = headers.get("Description", "")
        if status == "409" and "Consumer Deleted" in description:
            self._outstanding = 0
            self._consumer_check_due = True
        elif status == "409" and "Exceeded MaxWaiting" not in description:
            _log.info(
                "pull ended",
                consumer=self._consumer.durable,
                status=status,
                description=description,
            )
        if self._wake is not None:
            self._wake.set()

    async def _keep_alive_loop(self) -> None:
        """In-progress acks for long handlers (a third of ack_wait), deferred consumer checks."""
        every = self._keep_alive_every
        while True:
            await anyio.sleep(every / 2)
            if self._consumer_check_due:
                self._consumer_check_due = False
                await self._recreate_consumer()
            now = time.monotonic()
            for key, (msg, touched) in list(self.active.items()):
                if now - touched >= every and key in self.active:
                    self.active[key] = (msg, now)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _recreate_consumer(self) -> None:
        """A consumer lost with a server's state is recreated (best effort, logged)."""
        try:
            await self._check_consumer()
        except Exception as exc:
            _log.warning("consumer check failed", consumer=self._consumer.durable, error=str(exc))
            self._pull_failed(f"consumer check failed: {exc or type(exc).__name__}")


async def hand_back(msg: Msg) -> None:
    """A stopping replica naks what it will not handle: another one takes it now,
    instead of after ack_wait."""
    with contextlib.suppress(Exception):
        await msg.nak()


_handing_back: set[asyncio.Task[None]] = set()


def hand_back_now(msg: Msg) -> None:
    """`hand_back` from code that cannot wait: queued at once, or in a task."""
    try:
        if wire.ack_now(msg, _NAK):
            return
    except Exception:
        return  # acked already, or not a JetStream message: nothing to hand back
    task = asyncio.get_running_loop().create_task(hand_back(msg))
    _handing_back.add(task)
    task.add_done_callback(_handing_back.discard)
