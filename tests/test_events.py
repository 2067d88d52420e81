"""Event outcomes against a real JetStream server: ack, retry with backoff, dead letter."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import anyio
import msgspec
import nats
import pytest
from support.events import OrderCreated

from framework import (
    BatchPublisher,
    ConfigConflict,
    Context,
    InvalidName,
    NoStream,
    PublishError,
    Reject,
    Service,
    Stream,
    get_dead_letter,
    list_dead_letters,
    replay_dead_letter,
)
from framework.events.options import SubscribeOptions
from framework.streams import deadletter_stream, ensure_stream
from framework.testing import eventually as wait_until


async def test_publish_waits_for_ack_and_dedupes_by_event_id(serve, client):
    await serve(Service("orders", publishes=["order.created.v1"]))
    first = await client.publish("order.created.v1", OrderCreated("o-1", 5), event_id="order-o-1")
    again = await client.publish("order.created.v1", OrderCreated("o-1", 5), event_id="order-o-1")
    assert (first.stream, first.duplicate, again.duplicate) == ("EVENTS_ORDER", False, True)
    assert first.seq == again.seq
    info = await client.js.stream_info("EVENTS_ORDER")
    assert info.state.messages == 1


async def test_publish_to_a_type_no_stream_captures_is_an_error(client):
    with pytest.raises(NoStream, match=r"no stream captures events\.ghost\.appeared\.v1"):
        await client.publish("ghost.appeared.v1", {"x": 1})


@pytest.mark.parametrize(
    "bad", ["Order.created.v1", "order.created", "order.*.v1", "order created.v1", "a.b.c.d.v1"]
)
async def test_invalid_event_types_are_refused(client, bad):
    with pytest.raises(InvalidName):
        await client.publish(bad, {"x": 1})


async def test_duplicate_outside_dedupe_window_is_handled_once(serve, client):
    svc = Service(
        "payments", streams=[Stream("EVENTS_ORDER", ["events.order.>"], duplicate_window=0.5)]
    )
    handled: list[str] = []

    @svc.subscribe("order.created.v1")
    async def on_created(event: OrderCreated, ctx: Context) -> None:
        handled.append(ctx.event_id or "")

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o-1", 5), event_id="evt-1")
    await wait_until(lambda: len(handled) == 1)
    await anyio.sleep(1.0)  # past the stream's dedupe window: stored a second time
    second = await client.publish("order.created.v1", OrderCreated("o-1", 5), event_id="evt-1")
    assert not second.duplicate
    await client.publish("order.created.v1", OrderCreated("o-2", 5), event_id="evt-2")
    await wait_until(lambda: "evt-2" in handled)
    stats = (await client.stats("payments"))[0].endpoints[0]
    assert handled == ["evt-1", "evt-2"]
    assert stats.data is not None and stats.data["duplicates"] == 1


async def test_failing_twice_then_succeeding_uses_backoff_delays(serve, client):
    svc = Service("payments")
    attempts: list[tuple[int, float]] = []

    @svc.subscribe("order.created.v1", backoff=[0.4, 0.8], max_deliver=5)
    async def flaky(event: OrderCreated, ctx: Context) -> None:
        attempts.append((ctx.attempt, time.monotonic()))
        if ctx.attempt < 3:
            raise RuntimeError(f"transient failure {ctx.attempt}")

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o-1", 5))
    await wait_until(lambda: len(attempts) == 3)
    await anyio.sleep(0.3)
    assert [a for a, _ in attempts] == [1, 2, 3]
    first_gap = attempts[1][1] - attempts[0][1]
    second_gap = attempts[2][1] - attempts[1][1]
    assert first_gap >= 0.4 and second_gap >= 0.8, (first_gap, second_gap)
    stats = (await client.stats("payments"))[0].endpoints[0]
    assert (stats.num_requests, stats.num_errors) == (3, 2)
    assert stats.data is not None and stats.data["redelivered"] == 2
    assert await list_dead_letters(client) == []


async def test_always_failing_event_is_dead_lettered_and_replayable(serve, client):
    svc = Service("payments")
    attempts: list[int] = []
    healed = False

    @svc.subscribe("order.created.v1", backoff=[0.05], max_deliver=3)
    async def broken(event: OrderCreated, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if not healed:
            raise ValueError("provider unavailable")

    await serve(svc)
    ack = await client.publish(
        "order.created.v1", OrderCreated("o-9", 900), event_id="evt-9", headers={"X-Tenant": "t1"}
    )
    await wait_until(lambda: len(attempts) == 3)
    (letter,) = await wait_until(lambda: list_dead_letters(client), 5, "a dead letter", 0.05)
    assert (letter.reason, letter.attempts, letter.event_id) == ("max_deliver", 3, "evt-9")
    assert "provider unavailable" in letter.error
    assert (letter.service, letter.handler) == ("payments", "broken")
    assert (letter.subject, letter.stream, letter.sequence) == (
        "events.order.created.v1",
        "EVENTS_ORDER",
        ack.seq,
    )
    assert letter.headers["X-Tenant"] == "t1"
    assert msgspec.json.decode(letter.data.encode(), type=OrderCreated) == OrderCreated("o-9", 900)
    assert (await get_dead_letter(client, letter.id)).event_id == "evt-9"
    await anyio.sleep(0.5)
    assert attempts == [1, 2, 3]  # terminated: no further deliveries

    healed = True
    await replay_dead_letter(client, letter.id)
    await wait_until(lambda: len(attempts) == 4)
    assert attempts[-1] == 1  # a new attempt
    await wait_until(lambda: True)
    assert await list_dead_letters(client) == []


async def test_poison_payload_is_dead_lettered_at_once_and_does_not_block(serve, client, nats_url):
    svc = Service("payments")
    handled: list[str] = []

    @svc.subscribe("order.created.v1", max_concurrency=1, backoff=[0.05])
    async def on_created(event: OrderCreated) -> None:
        handled.append(event.order_id)

    await serve(svc)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.publish("events.order.created.v1", b"{not json")
        await js.publish("events.order.created.v1", b'{"order_id": 5}')
    finally:
        await nc.close()
    for n in range(5):
        await client.publish("order.created.v1", OrderCreated(f"o-{n}", 1))
    await wait_until(lambda: len(handled) == 5)
    letters = await list_dead_letters(client)
    assert sorted(d.reason for d in letters) == ["undecodable", "undecodable"]
    assert all(d.attempts == 1 for d in letters)
    assert any("malformed" in d.error for d in letters)
    assert any("Expected `str`" in d.error for d in letters)


async def test_reject_dead_letters_without_retry(serve, client):
    svc = Service("payments")
    attempts = 0

    @svc.subscribe("order.created.v1", backoff=[0.05])
    async def picky(event: OrderCreated) -> None:
        nonlocal attempts
        attempts += 1
        raise Reject("amount is negative")

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o", -1))
    letters = await wait_until(lambda: list_dead_letters(client), 5, "a dead letter", 0.05)
    assert (letters[0].reason, letters[0].error, attempts) == ("rejected", "amount is negative", 1)


async def test_fan_out_to_services_and_load_balancing_across_replicas(serve, client):
    handled: Counter[str] = Counter()

    def make(name: str, replica: int) -> Service:
        svc = Service(name)

        @svc.subscribe("order.created.v1")
        async def on_created(event: OrderCreated) -> None:
            handled[f"{name}/{replica}"] += 1
            await anyio.sleep(0.01)

        return svc

    for svc in (make("payments", 1), make("payments", 2), make("audit", 1)):
        await serve(svc)
    async with BatchPublisher(client) as batch:
        for n in range(60):
            await batch.publish("order.created.v1", OrderCreated(str(n), n))
    await wait_until(
        lambda: handled["payments/1"] + handled["payments/2"] == 60 and handled["audit/1"] == 60
    )
    assert handled["payments/1"] > 0 and handled["payments/2"] > 0


async def test_ordered_by_key_serializes_same_key_and_parallelizes_others(serve, client):
    svc = Service("ledger")
    log: list[tuple[str, int]] = []
    running: Counter[str] = Counter()
    overlap_same_key = False
    peak = 0

    @svc.subscribe("order.created.v1", ordered_by=lambda e: e.order_id, max_concurrency=8)
    async def apply(event: OrderCreated) -> None:
        nonlocal overlap_same_key, peak
        running[event.order_id] += 1
        overlap_same_key |= running[event.order_id] > 1
        peak = max(peak, sum(running.values()))
        await anyio.sleep(0.02)
        log.append((event.order_id, event.amount_cents))
        running[event.order_id] -= 1

    await serve(svc)
    async with BatchPublisher(client) as batch:
        for n in range(10):
            for key in ("a", "b", "c"):
                await batch.publish("order.created.v1", OrderCreated(key, n))
    await wait_until(lambda: len(log) == 30)
    assert not overlap_same_key
    assert peak > 1
    for key in ("a", "b", "c"):
        assert [n for k, n in log if k == key] == list(range(10))


async def test_long_handler_sends_in_progress_and_is_not_redelivered(serve, client):
    svc = Service("slow")
    attempts: list[int] = []
    done = anyio.Event()

    @svc.subscribe("order.created.v1", ack_wait=1.0)
    async def crunch(event: OrderCreated, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await anyio.sleep(2.5)
        done.set()

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o", 1))
    with anyio.fail_after(10):
        await done.wait()
    await anyio.sleep(1.5)
    assert attempts == [1]


async def test_handler_over_max_processing_time_is_cancelled_and_retried(serve, client):
    svc = Service("hangs")
    attempts: list[int] = []

    @svc.subscribe("order.created.v1", max_processing_time=0.3, backoff=[0.05])
    async def sometimes_hangs(event: OrderCreated, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await anyio.sleep(3600)

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o", 1))
    await wait_until(lambda: attempts == [1, 2])
    stats = (await client.stats("hangs"))[0].endpoints[0]
    assert stats.num_errors == 1 and "processing time exceeded" in stats.last_error


async def test_events_published_from_handlers_carry_correlation_and_causation(serve, client):
    orders, shipping = Service("orders", publishes=["order.paid.v1"]), Service("shipping")
    seen: dict[str, str | None] = {}

    @orders.subscribe("order.created.v1")
    async def pay(event: OrderCreated, ctx: Context) -> None:
        seen["first_event_id"] = ctx.event_id
        await ctx.publish("order.paid.v1", event)

    @shipping.subscribe("order.paid.v1")
    async def ship(event: OrderCreated, ctx: Context) -> None:
        seen["correlation"] = ctx.correlation_id
        seen["causation"] = ctx.causation_id
        seen["producer"] = ctx.headers.get("Producer")

    await serve(orders)
    await serve(shipping)
    await client.publish("order.created.v1", OrderCreated("o", 1), correlation_id="corr-7")
    await wait_until(lambda: "causation" in seen)
    assert seen["correlation"] == "corr-7"
    assert seen["causation"] == seen["first_event_id"]
    assert seen["producer"] == "orders"


async def test_declared_stream_conflict_is_reported_with_the_difference(serve, client, nats_url):
    await serve(
        Service("first", streams=[Stream("EVENTS_ORDER", ["events.order.>"], max_age=3600)])
    )
    clash = Service("second", streams=[Stream("EVENTS_ORDER", ["events.order.>"], max_age=7200)])
    with pytest.raises(ConfigConflict) as info:
        async with clash.serve(nats_url):
            pass
    assert "max_age" in str(info.value) and "3600" in str(info.value) and "7200" in str(info.value)
    assert (await client.js.stream_info("EVENTS_ORDER")).config.max_age == 3600


async def test_consumer_config_drift_is_detected(serve, client, nats_url):
    first = Service("payments")

    @first.subscribe("order.created.v1", deliver="all")
    async def on_created(event: OrderCreated) -> None: ...

    await serve(first)
    second = Service("payments")

    @second.subscribe("order.created.v1", deliver="new")
    async def on_created_again(event: OrderCreated) -> None: ...

    second.subscribers[0].durable = first.subscribers[0].durable
    with pytest.raises(ConfigConflict, match="deliver_policy"):
        async with second.serve(nats_url):
            pass


async def test_subscribers_appear_in_info_and_stats_with_lag(serve, client):
    svc = Service("payments")
    gate = anyio.Event()

    @svc.subscribe("order.created.v1", max_concurrency=1)
    async def on_created(event: OrderCreated) -> None:
        await gate.wait()

    await serve(svc)
    for n in range(10):
        await client.publish("order.created.v1", OrderCreated(str(n), n))
    await anyio.sleep(0.5)
    (info,) = await client.info("payments")
    (endpoint,) = info.endpoints
    assert endpoint.metadata is not None
    assert (endpoint.subject, endpoint.metadata["kind"], endpoint.metadata["consumer"]) == (
        "events.order.created.v1",
        "subscriber",
        "payments_on_created",
    )
    assert "order_id" in endpoint.metadata["event_schema"]
    (stats,) = await client.stats("payments")
    data = stats.endpoints[0].data
    assert data is not None and data["pending"] >= 7  # lag: the slow handler holds the rest back
    gate.set()
    await wait_until(lambda: True)


async def test_batch_publisher_stores_everything_with_bounded_outstanding(serve, client):
    await serve(Service("orders", publishes=["order.created.v1"]))
    async with BatchPublisher(client, max_outstanding=32) as batch:
        for n in range(1000):
            await batch.publish("order.created.v1", OrderCreated(str(n), n), event_id=f"b-{n}")
            assert len(batch._pending) <= 32
    assert len(batch.acks) == 1000 and not batch.failures
    assert (await client.js.stream_info("EVENTS_ORDER")).state.messages == 1000


async def test_batch_publisher_reports_what_was_not_stored(client):
    with pytest.raises(PublishError, match="not stored"):
        async with BatchPublisher(client) as batch:
            await batch.publish("nowhere.to.go.v1", {"x": 1})


async def test_idempotent_rpc_returns_the_stored_response(serve, client):
    svc = Service("payments")
    charges = 0

    @svc.rpc(idempotent=True)
    async def charge(req: OrderCreated) -> str:
        nonlocal charges
        charges += 1
        return f"charge-{charges}"

    await serve(svc)
    first = await client.call(
        "payments.charge", OrderCreated("o", 1), returns=str, idempotency_key="k-1"
    )
    again = await client.call(
        "payments.charge", OrderCreated("o", 1), returns=str, idempotency_key="k-1"
    )
    other = await client.call(
        "payments.charge", OrderCreated("o", 1), returns=str, idempotency_key="k-2"
    )
    plain = await client.call("payments.charge", OrderCreated("o", 1), returns=str)
    assert (first, again, other, plain) == ("charge-1", "charge-1", "charge-2", "charge-3")
    assert charges == 3


async def test_handlers_own_timeout_is_not_reported_as_processing_time(serve, client):
    svc = Service("waits")
    attempts: list[int] = []

    @svc.subscribe("order.created.v1", backoff=[0.05], max_processing_time=30)
    async def upstream(event: OrderCreated, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise TimeoutError("the upstream API did not answer")

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o", 1))
    await wait_until(lambda: attempts == [1, 2])
    stats = (await client.stats("waits"))[0].endpoints[0]
    assert stats.last_error == "TimeoutError: the upstream API did not answer"


async def test_ordered_by_that_raises_dead_letters_the_event_at_once(serve, client):
    svc = Service("ledger")
    handled: list[str] = []

    @svc.subscribe("order.created.v1", ordered_by=lambda e: {"unhashable": e.order_id})
    async def apply(event: OrderCreated) -> None:
        handled.append(event.order_id)

    @svc.subscribe("order.paid.v1", ordered_by=lambda e: e.order_id.split("-")[1])
    async def settle(event: OrderCreated) -> None:
        handled.append(event.order_id)

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o-1", 1))
    await client.publish("order.paid.v1", OrderCreated("nodash", 1))
    await client.publish("order.paid.v1", OrderCreated("o-2", 1))
    await wait_until(lambda: handled == ["o-2"])
    letters: list = []

    async def both_dead_lettered() -> bool:
        letters[:] = await list_dead_letters(client)
        return len(letters) == 2

    await wait_until(both_dead_lettered)
    assert {(d.handler, d.reason, d.attempts) for d in letters} == {
        ("apply", "invalid_key", 1),
        ("settle", "invalid_key", 1),
    }
    assert any("IndexError" in d.error for d in letters)


async def test_dead_letter_that_cannot_be_stored_keeps_the_event(serve, client):
    svc = Service("payments")

    @svc.subscribe("order.created.v1", backoff=[0.2])
    async def on_created(event: OrderCreated) -> None: ...

    await serve(svc)
    await client.js.delete_stream("DEADLETTER")  # nowhere to put the poison event
    await client.js.publish("events.order.created.v1", b"{poison")
    consumer = svc.subscribers[0]

    async def redelivered() -> bool:
        info = await client.js.consumer_info("EVENTS_ORDER", consumer.durable)
        return info.num_redelivered >= 1 and info.num_ack_pending == 1

    await wait_until(redelivered)  # not terminated: handed back to try again
    assert consumer.stats.dead_lettered == 0
    await ensure_stream(client, deadletter_stream())
    letters: list = []

    async def stored() -> bool:
        letters[:] = await list_dead_letters(client)
        return bool(letters)

    await wait_until(stored)
    assert letters[0].reason == "undecodable" and letters[0].attempts >= 2


async def test_an_idempotent_subscriber_looks_up_and_marks_whole_pulls(serve, client):
    handled: Counter[str] = Counter()
    svc = Service("batcher")

    workers: set[object] = set()

    @svc.subscribe("order.created.v1", max_concurrency=32)
    async def on_created(event: OrderCreated) -> None:
        handled[event.order_id] += 1
        workers.add(asyncio.current_task())

    await ensure_stream(client, Stream("EVENTS_ORDER", ["events.order.>"]))
    async with BatchPublisher(client) as batch:  # a backlog: every pull comes back full
        for n in range(300):
            await batch.publish("order.created.v1", OrderCreated(str(n), n), event_id=f"e-{n}")
    await serve(svc)
    processed = svc.subscribers[0]._processed
    assert processed is not None and processed._mux is not None
    await wait_until(lambda: len(handled) == 300)
    sub = svc.subscribers[0]

    async def all_acked() -> bool:
        info = await client.js.consumer_info(sub.stream, sub.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_until(all_acked)
    assert set(handled.values()) == {1}
    # per pull (at most 64 events): one lookup reply and a marker batch's two, where a
    # wait per event would have cost at least one reply per event for each
    # no worker waits for a lookup or a marker: handlers that do not block run back to
    # back in the workers a pull woke, instead of every worker parked on an event
    assert len(workers) <= 4, len(workers)
    assert processed._mux.replies < 100
    assert all(await asyncio.gather(*(processed.seen(f"e-{n}") for n in range(300))))
    assert sub._taken == 0 and not sub._active and not sub._deferred


async def test_an_event_whose_marker_cannot_be_stored_is_never_acked(serve, client):
    handled: Counter[str] = Counter()
    svc = Service("marks")

    @svc.subscribe("order.created.v1", max_processing_time=0.5, backoff=[0.1], max_deliver=50)
    async def on_created(event: OrderCreated) -> None:
        handled[event.order_id] += 1

    await serve(svc)
    sub = svc.subscribers[0]

    async def settled() -> bool:
        info = await client.js.consumer_info(sub.stream, sub.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await client.publish("order.created.v1", OrderCreated("a", 1), event_id="evt-a")
    await wait_until(settled)
    # the bucket is full: lookups still work, new markers are refused
    bucket = "KV_processed_marks_on_created"
    config = json.loads((await client.nc.request(f"$JS.API.STREAM.INFO.{bucket}", b"")).data)
    config = config["config"]
    config["max_msgs"], config["discard"] = 1, "new"
    await client.nc.request(f"$JS.API.STREAM.UPDATE.{bucket}", json.dumps(config).encode())

    await client.publish("order.created.v1", OrderCreated("b", 2), event_id="evt-b")
    # handled, marker refused until the settlement gives up (0.5 s), nak'd, run again
    await wait_until(lambda: handled["b"] >= 2, timeout=10)
    assert not await settled()  # never acked while its marker is not stored

    config["max_msgs"] = -1
    await client.nc.request(f"$JS.API.STREAM.UPDATE.{bucket}", json.dumps(config).encode())
    await wait_until(settled, timeout=10)
    runs = handled["b"]
    await anyio.sleep(0.5)
    assert handled == Counter({"a": 1, "b": runs})  # stored and acked: no more runs
    assert await sub._processed.seen("evt-b")
    assert sub.stats.dead_lettered == 0


@pytest.mark.parametrize("max_unsettled", [4, 6])
async def test_no_more_than_max_unsettled_events_wait_for_their_markers(
    serve, client, max_unsettled
):
    """What a crash could run twice (handled, marker not yet stored) stays within
    `max_unsettled`, not `max_concurrency`, even while markers cannot be stored. (While
    nothing settles, the pull window, twice `max_concurrency`, takes no more than 8.)"""
    bound = max_unsettled
    handled: Counter[str] = Counter()
    svc = Service("bounded")

    @svc.subscribe(
        "order.created.v1", max_concurrency=4, max_unsettled=max_unsettled, max_processing_time=30
    )
    async def on_created(event: OrderCreated) -> None:
        handled[event.order_id] += 1

    await serve(svc)
    sub = svc.subscribers[0]
    assert sub.options.unsettled_limit == bound
    assert sub.metadata()["max_unsettled"] == str(bound)
    bucket = "KV_processed_bounded_on_created"
    reply = await client.nc.request(f"$JS.API.STREAM.INFO.{bucket}", b"")
    config = json.loads(reply.data)["config"]
    config["max_msgs"], config["discard"] = 1, "new"  # after the first, markers refused
    await client.publish("order.created.v1", OrderCreated("first", 0), event_id="evt-first")
    await wait_until(lambda: handled["first"] == 1)
    await client.nc.request(f"$JS.API.STREAM.UPDATE.{bucket}", json.dumps(config).encode())

    total = bound + 16
    async with BatchPublisher(client) as batch:
        for n in range(total):
            await batch.publish("order.created.v1", OrderCreated(str(n), n), event_id=f"e-{n}")
    await wait_until(lambda: sum(handled.values()) >= 1 + bound)
    await anyio.sleep(1.0)  # the settlement keeps retrying; nothing more may start
    assert sum(handled.values()) == 1 + bound, handled

    config["max_msgs"] = -1
    await client.nc.request(f"$JS.API.STREAM.UPDATE.{bucket}", json.dumps(config).encode())
    await wait_until(lambda: len(handled) == total + 1, timeout=15)

    async def settled() -> bool:
        info = await client.js.consumer_info(sub.stream, sub.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_until(settled, timeout=15)
    assert set(handled.values()) == {1}  # the ones that waited were stored, not rerun


def test_max_unsettled_is_eight_times_max_concurrency_unless_given():
    """The documented default bound on what a crash can run twice: 128 at the defaults."""
    assert SubscribeOptions().unsettled_limit == 128
    assert SubscribeOptions(max_concurrency=5).unsettled_limit == 40
    assert SubscribeOptions(max_concurrency=5, max_unsettled=5).unsettled_limit == 5
    svc = Service("bounded")
    svc.subscribe("order.created.v1")(_noop_order_handler)
    assert svc.subscribers[0].metadata()["max_unsettled"] == "128"


async def _noop_order_handler(event: OrderCreated) -> None:
    pass


def test_max_unsettled_below_max_concurrency_is_refused_where_declared():
    svc = Service("bounded")
    with pytest.raises(ValueError, match=r"max_unsettled \(8\) must be at least max_concurrency"):
        svc.subscribe("order.created.v1", max_concurrency=16, max_unsettled=8)


async def test_a_batch_publisher_kept_for_many_batches_holds_one_batch(serve, client):
    await serve(Service("orders", publishes=["order.created.v1"]))
    publisher = BatchPublisher(client, max_outstanding=16)
    for round_ in range(3):
        for n in range(50):
            await publisher.publish("order.created.v1", OrderCreated(f"{round_}-{n}", n))
        acks = await publisher.flush()
        assert len(acks) == len(publisher.acks) == 50  # this batch's, not all so far
        assert {a.event_id for a in acks} == {a.event_id for a in publisher.acks}
    assert (await client.js.stream_info("EVENTS_ORDER")).state.messages == 150


async def test_a_failed_batch_lookup_falls_back_to_each_worker_asking(serve, client):
    handled: Counter[str] = Counter()
    svc = Service("lookupfail")

    @svc.subscribe("order.created.v1", max_concurrency=4)
    async def on_created(event: OrderCreated) -> None:
        handled[event.order_id] += 1

    await serve(svc)
    sub = svc.subscribers[0]
    processed = sub._processed
    assert processed is not None
    assert await processed.mark_all(["evt-done"]) == [None]  # handled before
    failures = 0

    async def unavailable(ids):  # the batched lookup fails; asking one by one works
        nonlocal failures
        failures += 1
        raise TimeoutError("no answer")

    processed.seen_among = unavailable  # type: ignore[method-assign]
    await client.publish("order.created.v1", OrderCreated("done", 1), event_id="evt-done")
    await client.publish("order.created.v1", OrderCreated("new", 2), event_id="evt-new")

    async def settled() -> bool:
        info = await client.js.consumer_info(sub.stream, sub.durable)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_until(lambda: handled["new"] == 1)
    await wait_until(settled)
    assert failures >= 1
    assert handled == Counter({"new": 1})  # the one already handled was skipped
    assert sub.duplicates == 1
    assert await processed.seen("evt-new")


async def test_an_idempotent_subscribers_window_follows_its_rate_not_max_concurrency(serve, client):
    """A fast idempotent subscriber looks up and pulls batches far larger than twice
    max_concurrency (its waiting events are looked up, not admitted); a slow one still
    takes only what it will start soon. Either way at most max_concurrency run."""
    lookups: dict[str, list[int]] = {"fast": [], "slow": []}
    running = {"fast": 0, "slow": 0}
    most = {"fast": 0, "slow": 0}

    def subscriber(name: str, pause: float) -> Service:
        svc = Service(name)

        @svc.subscribe("order.created.v1", max_concurrency=2)
        async def on_created(event: OrderCreated) -> None:
            running[name] += 1
            most[name] = max(most[name], running[name])
            await anyio.sleep(pause)
            running[name] -= 1

        return svc

    await ensure_stream(client, Stream("EVENTS_ORDER", ["events.order.>"]))
    async with BatchPublisher(client) as batch:
        for n in range(3000):
            await batch.publish("order.created.v1", OrderCreated(str(n), n), event_id=f"e-{n}")
    fast, slow = subscriber("fast", 0), subscriber("slow", 0.05)
    for name, svc in (("fast", fast), ("slow", slow)):
        await serve(svc)
        processed = svc.subscribers[0]._processed
        assert processed is not None
        look_up = processed.seen_among

        async def counted(ids, look_up=look_up, name=name):  # type: ignore[no-untyped-def]
            lookups[name].append(len(ids))
            return await look_up(ids)

        processed.seen_among = counted  # type: ignore[method-assign]

    async def fast_done() -> bool:
        sub = fast.subscribers[0]
        info = await client.js.consumer_info(sub.stream, sub.durable)
        return info.num_pending == 0 and info.num_ack_pending == 0

    await wait_until(fast_done, timeout=60)
    assert max(lookups["fast"]) > 4 * 2, lookups["fast"]  # not tied to 2 x max_concurrency
    assert max(lookups["slow"]) <= 2 * 2, lookups["slow"]  # what two workers start soon
    assert most == {"fast": 2, "slow": 2}


async def test_a_plain_subscribers_window_grows_with_its_rate(serve, client):
    """No-op handlers pull more than twice max_concurrency ahead (the window follows the
    settle rate); the slow-consumer fault test checks that slow ones do not."""
    pulls: list[int] = []
    handled: list[str] = []
    svc = Service("plainfast")

    @svc.subscribe("order.created.v1", max_concurrency=2, idempotent=False)
    async def on_created(event: OrderCreated) -> None:
        handled.append(event.order_id)

    await ensure_stream(client, Stream("EVENTS_ORDER", ["events.order.>"]))
    async with BatchPublisher(client) as batch:
        for n in range(3000):
            await batch.publish("order.created.v1", OrderCreated(str(n), n), event_id=f"e-{n}")
    puller = svc.subscribers[0]._puller
    ask = puller._pull_request

    def counted(size: int) -> bytes:
        pulls.append(size)
        return ask(size)

    puller._pull_request = counted  # type: ignore[method-assign]
    await serve(svc)
    await wait_until(lambda: len(handled) >= 3000, timeout=60)
    assert max(pulls) > 2 * 2, pulls
