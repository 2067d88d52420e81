"""Conformance: the universal pub/sub tests mature messaging libraries run on every backend.

Adapted from Watermill's pub/sub test suite (publish/subscribe intact, concurrent
publishers and consumer groups, resend on error, close and reopen mid-stream,
fan-out, topic isolation, new consumers reading old messages, broker restarts),
all against real nats-server processes. Every test counts what it published and
what its handlers saw, and every assertion message prints published / handled /
lost / duplicated so a failure says what went wrong without a debugger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.lowlevel
import msgspec
import pytest
from nats.errors import Error as NatsError

from framework import (
    BatchPublisher,
    Client,
    Context,
    PublishAck,
    PublishError,
    Service,
    connect,
    list_dead_letters,
)
from framework.dev.devserver import NatsServer
from framework.testing import eventually as wait_until

CREATED = "order.created.v1"
CANCELLED = "order.cancelled.v1"
CAPTURED = "payment.captured.v1"


class Payload(msgspec.Struct):
    n: int
    text: str
    amount: float
    tags: list[str]
    note: str | None = None


class Typed(msgspec.Struct):
    kind: str
    n: int


def payload(n: int) -> Payload:
    return Payload(
        n=n,
        text=f'événement №{n} ✓ "quoted" <tag> & {{braces}}',
        amount=n * 1.25,
        tags=[f"t{n % 3}", "ünïcode", ""],
        note=None if n % 2 else f"note-{n}",
    )


class Tally:
    """What a test published and what its handlers ran, keyed by event id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.published: list[str] = []
        self.handled: Counter[str] = Counter()  # handler invocations per event id

    def handle(self, event_id: str | None) -> None:
        assert event_id is not None
        self.handled[event_id] += 1

    @property
    def distinct(self) -> int:
        return len(self.handled)

    def lost(self, expected: Iterable[str] | None = None) -> set[str]:
        return set(self.published if expected is None else expected) - set(self.handled)

    def duplicated(self) -> int:
        return sum(count - 1 for count in self.handled.values() if count > 1)

    def unexpected(self) -> set[str]:
        return set(self.handled) - set(self.published)

    def report(self) -> str:
        lost = sorted(self.lost())
        sample = f" e.g. {lost[:5]}" if lost else ""
        return (
            f"{self.name}: published={len(set(self.published))} "
            f"handled={self.distinct} (invocations={self.handled.total()}) "
            f"lost={len(lost)}{sample} duplicated={self.duplicated()} "
            f"unexpected={len(self.unexpected())}"
        )

    def assert_exactly_once(self, extra: str = "") -> None:
        report = self.report() + (f"; {extra}" if extra else "")
        assert not self.lost(), report
        assert not self.unexpected(), report
        assert self.duplicated() == 0, report


async def wait_settled(
    client: Client, services: Iterable[Service], timeout: float, report: Callable[[], str]
) -> None:
    """Until every consumer of `services` has nothing pending and nothing unacked.

    Then no further delivery (and so no late duplicate) can come: counts are final.
    """
    subscribers = [sub for svc in services for sub in svc.subscribers]
    state: dict[str, tuple[int, int]] = {}

    async def settled() -> bool:
        for sub in subscribers:
            info = await client.js.consumer_info(sub.stream, sub.durable)
            state[sub.durable] = (info.num_pending, info.num_ack_pending)
        return all(pending == unacked == 0 for pending, unacked in state.values())

    def unsettled() -> str:
        return f"consumers to settle; (pending, unacked) {state}: {report()}"

    await wait_until(settled, timeout, unsettled, 0.05)


async def publish_batch(
    client: Client, event_type: str, events: Iterable[tuple[str, msgspec.Struct]]
) -> list[str]:
    """Publish with a BatchPublisher; the ids of every event JetStream stored."""
    sent: list[str] = []
    async with BatchPublisher(client, max_outstanding=256) as publisher:
        for event_id, event in events:
            sent.append(await publisher.publish(event_type, event, event_id=event_id))
    stored = [ack.event_id for ack in publisher.acks]
    # flush() raises when acks are missing (test_batch_flush_raises_when_acks_never_come)
    assert sorted(stored) == sorted(sent), (len(sent), len(stored), publisher.failures[:5])
    return stored


def show(tally: Tally, started: float, extra: str = "") -> None:
    """One summary line per test (visible with `pytest -s`)."""
    print(f"\n[conformance] {tally.report()} in {time.monotonic() - started:.2f}s {extra}")


# -- 1. publish/subscribe: payload, headers and ids intact -------------------------------


async def test_publish_subscribe_events_intact(nats_url: str, serve) -> None:
    started = time.monotonic()
    svc = Service("conf-intact")
    tally = Tally("intact")
    received: dict[str, tuple[Payload, dict[str, str], str, str | None, int]] = {}

    @svc.subscribe(CREATED)
    async def on_created(event: Payload, ctx: Context) -> None:
        assert ctx.event_id is not None
        tally.handle(ctx.event_id)
        received[ctx.event_id] = (
            event,
            dict(ctx.headers),
            ctx.correlation_id,
            ctx.causation_id,
            ctx.attempt,
        )

    await serve(svc)
    sent: dict[str, tuple[int, Payload]] = {}
    seqs: list[int] = []
    async with connect(nats_url, name="conf-producer") as producer:
        for i in range(100):
            ack = await producer.publish(
                CREATED,
                payload(i),
                # half with the caller's business key as event id, half generated
                event_id=f"order-{i}" if i % 2 == 0 else None,
                headers={"X-Conformance": f"case-{i}"},
                correlation_id=f"corr-{i}",
            )
            assert ack.stream == "EVENTS_ORDER" and not ack.duplicate, ack
            seqs.append(ack.seq)
            tally.published.append(ack.event_id)
            sent[ack.event_id] = (i, payload(i))
    assert seqs == sorted(seqs) and len(set(seqs)) == 100, seqs
    assert len(sent) == 100, f"event ids not unique: {tally.report()}"

    await wait_until(lambda: tally.distinct >= 100, 15, tally.report)
    tally.assert_exactly_once()
    now = datetime.now(UTC)
    for event_id, (i, expected) in sent.items():
        if i % 2 == 0:
            assert event_id == f"order-{i}"
        event, headers, correlation_id, causation_id, attempt = received[event_id]
        assert event == expected, (i, event, expected)
        assert attempt == 1
        assert correlation_id == f"corr-{i}"
        assert causation_id is None
        assert headers["Nats-Msg-Id"] == event_id, headers
        assert headers["Event-Type"] == CREATED, headers
        assert headers["Correlation-Id"] == f"corr-{i}", headers
        assert headers["Producer"] == "conf-producer", headers
        assert headers["X-Conformance"] == f"case-{i}", headers
        event_time = datetime.fromisoformat(headers["Event-Time"])
        assert event_time.tzinfo is not None, headers["Event-Time"]
        assert abs((now - event_time).total_seconds()) < 60, headers["Event-Time"]
    show(tally, started)


# -- 2. concurrent publishers, replicas share one consumer -------------------------------


@pytest.mark.slow
async def test_concurrent_publishers_and_replicas_handle_each_event_once(
    nats_url: str, client: Client, serve
) -> None:
    started = time.monotonic()
    publishers, per_publisher, replicas = 50, 100, 5
    total = publishers * per_publisher
    tally = Tally("replicas")
    by_replica: Counter[int] = Counter()

    def replica(index: int) -> Service:
        svc = Service("conf-replicas")  # same name: one durable consumer, shared

        @svc.subscribe(CREATED, max_concurrency=32)
        async def on_created(event: Payload, ctx: Context) -> None:
            tally.handle(ctx.event_id)
            by_replica[index] += 1

        return svc

    instances = [replica(index) for index in range(replicas)]
    for svc in instances:
        await serve(svc)

    async def publisher(p: int) -> None:
        async with connect(nats_url, name=f"conf-publisher-{p}") as own:
            for k in range(per_publisher):
                event_id = f"p{p:02d}-{k:03d}"
                await own.publish(CREATED, payload(k), event_id=event_id)
                tally.published.append(event_id)

    async with anyio.create_task_group() as tg:
        for p in range(publishers):
            tg.start_soon(publisher, p)
    assert len(set(tally.published)) == total, tally.report()

    def report() -> str:
        return f"{tally.report()}; per replica {dict(sorted(by_replica.items()))}"

    await wait_until(lambda: tally.distinct >= total, 60, report)
    await wait_settled(client, instances, 10, report)
    tally.assert_exactly_once(report())
    busy = [r for r, count in by_replica.items() if count]
    assert len(busy) > 1, f"load not shared: {report()}"
    show(tally, started, f"per replica {dict(sorted(by_replica.items()))}")


# -- 3. resend on error -------------------------------------------------------------------


async def test_failed_events_are_redelivered(nats_url: str, client: Client, serve) -> None:
    started = time.monotonic()
    svc = Service("conf-resend")
    tally = Tally("resend")
    attempts: defaultdict[str, list[int]] = defaultdict(list)

    @svc.subscribe(CREATED, backoff=[0.05], max_concurrency=32)
    async def flaky(event: Payload, ctx: Context) -> None:
        assert ctx.event_id is not None
        attempts[ctx.event_id].append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError(f"first attempt of {event.n} fails")
        tally.handle(ctx.event_id)

    await serve(svc)
    tally.published = await publish_batch(
        client, CREATED, ((f"resend-{i}", payload(i)) for i in range(100))
    )

    def report() -> str:
        first = sum(1 for a in attempts.values() if 1 in a)
        return f"{tally.report()}; failed first attempts={first}"

    await wait_until(lambda: tally.distinct >= 100, 20, report)
    tally.assert_exactly_once(report())
    wrong = {k: v for k, v in attempts.items() if v != [1, 2]}
    assert not wrong, f"attempts other than [1, 2]: {dict(list(wrong.items())[:5])}; {report()}"
    subscriber = svc.subscribers[0]
    assert subscriber.stats.redelivered == 100, report()
    assert await list_dead_letters(client) == [], report()
    show(tally, started, f"redelivered={subscriber.stats.redelivered}")


# -- 4. subscribers close and reopen mid-stream ------------------------------------------


@pytest.mark.slow
async def test_no_loss_when_subscriber_closes_and_reopens(nats_url: str, client: Client) -> None:
    started = time.monotonic()
    total, chunk = 2000, 50
    svc = Service("conf-reopen")
    tally = Tally("reopen")
    late = Counter[str]()  # handled on a redelivery (stranded when a session closed)

    # A short ack_wait: events delivered to a session that closes before handling
    # them come back after ack_wait (default 30 s), see the report.
    @svc.subscribe(CREATED, max_concurrency=32, ack_wait=2.0)
    async def on_created(event: Payload, ctx: Context) -> None:
        tally.handle(ctx.event_id)  # the side effect
        if ctx.attempt > 1:
            late[ctx.event_id] += 1
        await anyio.sleep(0.002)

    done_publishing = anyio.Event()

    async def publish_all() -> None:
        for start in range(0, total, chunk):
            ids = await publish_batch(
                client,
                CREATED,
                ((f"reopen-{i}", payload(i)) for i in range(start, start + chunk)),
            )
            tally.published.extend(ids)
            await anyio.sleep(0.02)
        done_publishing.set()

    def report() -> str:
        return f"{tally.report()}; handled on redelivery={len(late)}"

    sessions = 0
    async with anyio.create_task_group() as tg:
        # The first session creates the stream; publishing starts once it runs.
        for stop_at in (300, 700, 1100, 1500):
            async with svc.serve(nats_url, grace=5):
                sessions += 1
                if sessions == 1:
                    tg.start_soon(publish_all)
                await wait_until(lambda s=stop_at: tally.distinct >= s, 30, report)
            # closed mid-stream: publishing goes on while nobody consumes
            mark = len(tally.published)
            await wait_until(lambda m=mark: len(tally.published) >= min(total, m + 150), 30, report)
        async with svc.serve(nats_url, grace=5):
            sessions += 1
            await done_publishing.wait()
            await wait_until(lambda: tally.distinct >= total, 30, report)
            await wait_settled(client, [svc], 10, report)
    assert len(tally.published) == total, report()
    tally.assert_exactly_once(f"{report()}; sessions={sessions}")
    show(tally, started, f"sessions={sessions} handled on redelivery={len(late)}")


# -- 5. fan-out ---------------------------------------------------------------------------


async def test_each_service_gets_every_event(nats_url: str, client: Client, serve) -> None:
    started = time.monotonic()
    tallies = {name: Tally(name) for name in ("conf-fan-a", "conf-fan-b")}

    def service(name: str) -> Service:
        svc = Service(name)

        @svc.subscribe(CREATED, max_concurrency=32)
        async def on_created(event: Payload, ctx: Context) -> None:
            tallies[name].handle(ctx.event_id)

        return svc

    services = [service(name) for name in tallies]
    for svc in services:
        await serve(svc)
    published = await publish_batch(client, CREATED, ((f"fan-{i}", payload(i)) for i in range(500)))
    for tally in tallies.values():
        tally.published = published

    def report() -> str:
        return " | ".join(t.report() for t in tallies.values())

    await wait_until(lambda: all(t.distinct >= 500 for t in tallies.values()), 30, report)
    await wait_settled(client, services, 10, report)
    for tally in tallies.values():
        tally.assert_exactly_once(report())
        show(tally, started)


# -- 6. event types are isolated ----------------------------------------------------------


async def test_subscribers_see_only_their_event_type(nats_url: str, client: Client, serve) -> None:
    started = time.monotonic()
    svc = Service("conf-types")
    kinds = (CREATED, CANCELLED, CAPTURED)
    tallies = {kind: Tally(kind) for kind in kinds}
    foreign: list[tuple[str, str, str]] = []  # (subscribed type, header type, payload kind)

    def record(subscribed: str, event: Typed, ctx: Context) -> None:
        header = ctx.headers.get("Event-Type", "")
        if header != subscribed or event.kind != subscribed:
            foreign.append((subscribed, header, event.kind))
        tallies[subscribed].handle(ctx.event_id)

    @svc.subscribe(CREATED)
    async def on_created(event: Typed, ctx: Context) -> None:
        record(CREATED, event, ctx)

    @svc.subscribe(CANCELLED)
    async def on_cancelled(event: Typed, ctx: Context) -> None:
        record(CANCELLED, event, ctx)

    @svc.subscribe(CAPTURED)
    async def on_captured(event: Typed, ctx: Context) -> None:
        record(CAPTURED, event, ctx)

    await serve(svc)
    for i in range(100):  # interleaved, so each stream holds a mix
        for kind in kinds:
            ack = await client.publish(kind, Typed(kind, i), event_id=f"{kind}-{i}")
            tallies[kind].published.append(ack.event_id)

    def report() -> str:
        return " | ".join(t.report() for t in tallies.values()) + f"; foreign={foreign[:5]}"

    await wait_until(lambda: all(t.distinct >= 100 for t in tallies.values()), 20, report)
    await wait_settled(client, [svc], 10, report)
    assert not foreign, report()
    for tally in tallies.values():
        tally.assert_exactly_once(report())
    # The filter is the server's: each consumer was delivered its 100 events, no more.
    for sub in svc.subscribers:
        info = await client.js.consumer_info(sub.stream, sub.durable)
        assert info.delivered.consumer_seq == 100, (sub.durable, info.delivered, report())
        assert info.num_pending == 0 and info.num_ack_pending == 0, (sub.durable, info)
    assert await list_dead_letters(client) == [], report()
    for tally in tallies.values():
        show(tally, started)


# -- 7. a new consumer reads old events (deliver="all"), or only new ones ----------------


async def test_new_consumer_reads_old_events(nats_url: str, client: Client, serve) -> None:
    started = time.monotonic()
    await serve(Service("conf-producer", publishes=[CREATED]))  # declares the stream
    old = await publish_batch(client, CREATED, ((f"old-{i}", payload(i)) for i in range(200)))
    assert len(old) == 200

    all_tally, new_tally = Tally("deliver-all"), Tally("deliver-new")
    reads_all, reads_new = Service("conf-late-all"), Service("conf-late-new")

    @reads_all.subscribe(CREATED)
    async def on_created_all(event: Payload, ctx: Context) -> None:
        all_tally.handle(ctx.event_id)

    @reads_new.subscribe(CREATED, deliver="new")
    async def on_created_new(event: Payload, ctx: Context) -> None:
        new_tally.handle(ctx.event_id)

    await serve(reads_all)
    await serve(reads_new)

    def report() -> str:
        return f"{all_tally.report()} | {new_tally.report()}"

    all_tally.published = list(old)
    await wait_until(lambda: all_tally.distinct >= 200, 20, report)
    sub = reads_new.subscribers[0]
    info = await client.js.consumer_info(sub.stream, sub.durable)
    assert info.num_pending == 0 and info.delivered.consumer_seq == 0, (info, report())
    assert new_tally.distinct == 0, report()

    new = await publish_batch(client, CREATED, ((f"new-{i}", payload(i)) for i in range(100)))
    all_tally.published += new
    new_tally.published = new
    await wait_until(lambda: all_tally.distinct >= 300 and new_tally.distinct >= 100, 20, report)
    await wait_settled(client, [reads_all, reads_new], 10, report)
    all_tally.assert_exactly_once(report())
    new_tally.assert_exactly_once(report())
    assert not set(new_tally.handled) & set(old), report()
    show(all_tally, started)
    show(new_tally, started)


# -- 8. server restarted twice mid-stream -------------------------------------------------


@pytest.mark.slow
async def test_no_loss_across_server_restarts(
    nats_server: NatsServer, client: Client, serve
) -> None:
    started = time.monotonic()
    # One BatchPublisher per chunk: a chunk whose acks died with the server is re-sent
    # id by id (the stream deduplicates what was stored after all).
    total, chunk = 10_000, 256
    restart_at = (3000, 6500)
    tally = Tally("restarts")
    redelivered = Counter[str]()
    svc = Service("conf-restarts")

    @svc.subscribe(CREATED, max_concurrency=64, ack_wait=5.0)
    async def on_created(event: Payload, ctx: Context) -> None:
        tally.handle(ctx.event_id)
        if ctx.attempt > 1:
            redelivered[ctx.event_id] += 1

    await serve(svc)
    ids = [f"restart-{i:05d}" for i in range(total)]
    tally.published = ids  # what must arrive; `acked` says what JetStream stored so far
    acked: set[str] = set()
    figures = Counter[str]()  # retried, duplicate acks, restarts

    async def publish_until_acked(event_id: str, n: int) -> None:
        """The same event id until JetStream acks it: a stored one is deduplicated."""
        while True:
            try:
                ack = await client.publish(CREATED, payload(n), event_id=event_id, timeout=2.0)
            except (PublishError, NatsError, OSError):
                figures["retried"] += 1
                await anyio.sleep(0.1)
                continue
            figures["duplicate acks"] += ack.duplicate
            acked.add(ack.event_id)
            return

    async def publish_all() -> None:
        for start in range(0, total, chunk):
            numbers = range(start, min(total, start + chunk))
            batch = BatchPublisher(client, max_outstanding=chunk, timeout=3.0)
            for n in numbers:
                try:
                    await batch.publish(CREATED, payload(n), event_id=ids[n])
                except (PublishError, NatsError, OSError):
                    figures["publish raised"] += 1  # retried below: it has no ack
            try:
                await batch.flush()
            except PublishError:
                figures["flush raised"] += 1
            else:
                # flush() returned: every event of the batch should have its ack
                figures["unacked after clean flush"] += len(numbers) - len(batch.acks)
            acked.update(ack.event_id for ack in batch.acks)
            for n in numbers:
                if ids[n] not in acked:
                    figures["republished"] += 1
                    await publish_until_acked(ids[n], n)

    async def restart_server() -> None:
        for threshold in restart_at:
            await wait_until(lambda t=threshold: len(acked) >= t, 30, report)
            await anyio.to_thread.run_sync(nats_server.restart)
            figures["restarts"] += 1

    def report() -> str:
        return (
            f"{tally.report()}; acked={len(acked)} {dict(figures)} "
            f"handled on redelivery={len(redelivered)}"
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(restart_server)
        await publish_all()
    assert figures["restarts"] == 2, report()
    assert not set(ids) - acked, report()
    await wait_until(lambda: tally.distinct >= total, 60, report)
    await wait_settled(client, [svc], 30, report)
    assert not tally.lost(), report()
    assert not tally.unexpected(), report()
    # No handler runs twice: a processed-marker write that fails while the server is
    # down is retried before the ack (test_handled_event_is_acked_once_the_server_is_back).
    assert tally.duplicated() == 0, report()
    info = await client.js.stream_info("EVENTS_ORDER")
    assert info.state.messages == total, (info.state, report())
    assert await list_dead_letters(client) == [], report()
    show(tally, started, f"{dict(figures)} handled on redelivery={len(redelivered)}")


def freeze(server: NatsServer) -> int:
    """SIGSTOP the server and wait until it is stopped: it reads and acks nothing more."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    stat = Path(f"/proc/{pid}/stat")
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, "nats-server did not stop"
        time.sleep(0.005)
    return pid


# -- regressions: framework bugs this suite found (fixed) ---------------------------------


async def test_batch_flush_raises_when_acks_never_come(
    nats_server: NatsServer, client: Client, serve
) -> None:
    await serve(Service("conf-flush", publishes=[CREATED]))
    batch = BatchPublisher(client, max_outstanding=64, timeout=0.5)
    pid = freeze(nats_server)  # the socket takes the bytes, the server never acks
    try:
        for i in range(10):
            await batch.publish(CREATED, payload(i), event_id=f"flush-{i}")
        error: PublishError | None = None
        acks: list[PublishAck] | None = None
        try:
            acks = await batch.flush()
        except PublishError as exc:
            error = exc
        await anyio.lowlevel.checkpoint()  # let the cancelled futures' callbacks run
        assert error is not None, (
            f"flush() returned {acks!r} for 10 events without acks; only afterwards "
            f"failures={len(batch.failures)} e.g. {batch.failures[:1]}"
        )
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_batch_publish_does_not_hang_when_acks_are_lost(
    nats_server: NatsServer, client: Client, serve
) -> None:
    await serve(Service("conf-window", publishes=[CREATED]))
    batch = BatchPublisher(client, max_outstanding=4, timeout=1.0)
    freeze(nats_server)
    for i in range(4):  # these sit unread in the stopped server's socket
        await batch.publish(CREATED, payload(i), event_id=f"window-{i}")
    await anyio.to_thread.run_sync(nats_server.kill)  # ...and die with it
    await anyio.to_thread.run_sync(nats_server.start)
    await wait_until(lambda: client.nc.is_connected, 10, lambda: "client did not reconnect")
    await client.publish(CREATED, payload(-1), event_id="window-probe")  # the server is back
    # The fifth publish must either go out or raise PublishError, within the timeout.
    with anyio.move_on_after(5) as waited, contextlib.suppress(PublishError):
        await batch.publish(CREATED, payload(4), event_id="window-4")
    assert not waited.cancelled_caught, (
        "publish() still blocked after 5s (max_outstanding=4, timeout=1.0): the acks of "
        f"4 earlier events were lost with the server; acks={len(batch.acks)} "
        f"failures={len(batch.failures)}"
    )


@pytest.mark.slow
async def test_handled_event_is_acked_once_the_server_is_back(
    nats_server: NatsServer, client: Client, serve
) -> None:
    svc = Service("conf-marker")
    tally = Tally("marker")
    stopped = anyio.Event()

    @svc.subscribe(CREATED, max_concurrency=1)
    async def on_created(event: Payload, ctx: Context) -> None:
        tally.handle(ctx.event_id)  # the side effect is done...
        if tally.handled[ctx.event_id or ""] == 1:
            await anyio.to_thread.run_sync(nats_server.stop)  # ...then the server goes away
            stopped.set()

    await serve(svc)
    tally.published.append(
        (await client.publish(CREATED, payload(1), event_id="marker-1")).event_id
    )
    with anyio.fail_after(10):
        await stopped.wait()
    # Down longer than a JetStream API request waits (5 s): the marker write fails.
    await anyio.sleep(6)
    await anyio.to_thread.run_sync(nats_server.start)
    sub = svc.subscribers[0]

    async def settled() -> bool:
        with contextlib.suppress(Exception):  # the client is still reconnecting
            info = await client.js.consumer_info(sub.stream, sub.durable)
            return info.num_ack_pending == 0 and info.num_pending == 0
        return False

    await wait_until(
        settled,
        5,
        lambda: (
            "the ack of the event handled once (still unacked after the server came back: "
            f"it is redelivered after ack_wait and handled again); {tally.report()}"
        ),
        0.1,
    )
    tally.assert_exactly_once()
