"""A batch rides out a leader election: `client.batch()` sends again, with the same event
id, what a stream without a reachable leader refuses, within its timeout (real servers).

- an R3 stream's leader steps down (or is killed) mid-batch: `flush()` raises nothing,
  every event is stored exactly once, and some were really sent again;
- a refusal that is not about a leader (no stream on one server, a real API error on a
  cluster) still fails at once, with the same error as before;
- a stream that never gets a leader back: the batch fails after its timeout, not later.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import anyio.to_thread
import pytest
from faultkit import EVENT, STREAM, OrderCreated, record_figures, wait_for_r3_placement
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from framework import BatchPublisher, Client, PublishError, connect
from framework.dev.devserver import NatsCluster
from framework.events.publish import publish_error
from framework.streams import ensure_streams
from framework.testing import eventually as wait_until

pytestmark = pytest.mark.slow

SUBJECT = f"events.{EVENT}"


async def r3_stream(client: Client) -> str:
    """The R3 `EVENTS_ORDER` stream once all three peers can hold it; its leader."""
    await wait_for_r3_placement(client)
    await ensure_streams(client, [], [EVENT])
    info = await client.js.stream_info(STREAM)
    assert info.config.num_replicas == 3
    return str(info.cluster.leader)


async def stored_ids(client: Client) -> Counter[str]:
    """How often each event id is in the stream, read back with an ordered consumer once
    JetStream's API answers again (a killed node may have been the meta leader too)."""

    async def read() -> Counter[str] | None:
        ids: Counter[str] = Counter()
        try:
            total = (await client.js.stream_info(STREAM)).state.messages
            sub = await client.js.subscribe(SUBJECT, stream=STREAM, ordered_consumer=True)
        except NatsError:  # no meta leader yet: ask again
            return None
        try:
            for _ in range(total):
                msg = await sub.next_msg(timeout=10)
                ids[(msg.headers or {}).get("Nats-Msg-Id", "")] += 1
        finally:
            await sub.unsubscribe()
        return ids

    return await wait_until(read, 60, "the stream read back", interval=0.5)


async def publish_all(batch: BatchPublisher, total: int, fault_at: int, fault: Any) -> None:
    """Events e-0 .. e-<total-1>; `fault()` is awaited before event `fault_at` goes."""
    for i in range(total):
        if i == fault_at:
            await fault()
        await batch.publish(EVENT, OrderCreated(f"o-{i}", i), event_id=f"e-{i}")


def assert_each_stored_once(batch: BatchPublisher, ids: Counter[str], total: int) -> None:
    expected = {f"e-{i}" for i in range(total)}
    assert not batch.failures, batch.failures[:3]
    acked = [ack.event_id for ack in batch.acks]
    assert len(acked) == total and set(acked) == expected  # each event acked once
    twice = {i: n for i, n in ids.items() if n != 1}
    assert set(ids) == expected and not twice, (len(ids), len(expected - set(ids)), twice)


async def test_batch_rides_out_a_leader_stepdown(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The R3 stream's leader steps down a third of the way through 3,000 events."""
    monkeypatch.setenv("MESH_REPLICAS", "3")
    total = 3000
    async with connect(nats_cluster.urls) as client:
        leader_before = await r3_stream(client)

        async def step_down() -> None:
            api = f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}"
            reply = await client.nc.request(api, b"", timeout=5.0)
            assert b'"success":true' in reply.data.replace(b" ", b""), reply.data

        started = time.monotonic()
        async with client.batch() as batch:  # leaving it flushes: must raise nothing
            await publish_all(batch, total, total // 3, step_down)
        took = time.monotonic() - started
        ids = await stored_ids(client)
        leader_after = (await client.js.stream_info(STREAM)).cluster.leader
    print(
        f"stepdown {leader_before} -> {leader_after}: {total} events in {took:.2f} s, "
        f"{batch.retried} sent again, {sum(ids.values())} stored"
    )
    assert_each_stored_once(batch, ids, total)
    assert batch.retried > 0  # the retry path ran: some events were refused or unanswered


async def test_batch_rides_out_the_loss_of_the_leader_node(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node leading the R3 stream is killed mid-batch; the publisher sits on another
    node, so its acks are lost or refused until a new leader is elected (seconds)."""
    monkeypatch.setenv("MESH_REPLICAS", "3")
    total = 2000
    async with connect(nats_cluster.urls) as admin:
        leader = await r3_stream(admin)
    victim = next(node for node in nats_cluster.nodes if node.server_name == leader)
    others = [node.url for node in nats_cluster.nodes if node is not victim]
    async with connect(others) as client:

        async def kill_leader() -> None:
            await anyio.to_thread.run_sync(victim.kill)

        started = time.monotonic()
        async with client.batch(timeout=30.0) as batch:  # an election takes seconds here
            await publish_all(batch, total, total // 3, kill_leader)
        took = time.monotonic() - started
        ids = await stored_ids(client)
    record_figures(
        "batch_leader_node_killed",
        published=total,
        stored=sum(ids.values()),
        sent_again=batch.retried,
        failures=len(batch.failures),
        seconds=round(took, 2),
    )
    assert_each_stored_once(batch, ids, total)
    assert batch.retried > 0


async def test_refusals_not_about_a_leader_fail_at_once(client: Client) -> None:
    """One server: "no responders" means no stream captures the subject. Not retried:
    the batch fails long before its timeout, with the error it always gave."""
    batch = client.batch(timeout=30.0)
    started = time.monotonic()
    with pytest.raises(PublishError, match=r"1 event\(s\) not stored") as raised:
        async with batch:
            await batch.publish("nowhere.to.go.v1", {"x": 1}, event_id="lost-1")
    assert time.monotonic() - started < 10.0  # not the 30 s timeout
    expected = str(publish_error("events.nowhere.to.go.v1", NoRespondersError()))
    assert batch.failures == [("lost-1", expected)]
    assert expected in str(raised.value) and "no stream captures" in expected
    assert batch.retried == 0


async def test_refusals_not_about_a_leader_fail_at_once_on_a_cluster(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster a 503 is retried, but not when JetStream says no stream captures the
    subject, nor a JetStream API error that is not "temporarily unavailable" (here:
    larger than the stream's max_msg_size)."""
    monkeypatch.setenv("MESH_REPLICAS", "3")
    async with connect(nats_cluster.urls) as client:
        await wait_for_r3_placement(client)
        await client.js.add_stream(
            name=STREAM, subjects=["events.order.>"], num_replicas=3, max_msg_size=1024
        )
        batch = client.batch(timeout=30.0)
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"2 event\(s\) not stored"):
            async with batch:
                await batch.publish(EVENT, OrderCreated("o-small", 1), event_id="small")
                await batch.publish(EVENT, OrderCreated("o" * 2000, 2), event_id="large")
                await batch.publish("nowhere.to.go.v1", {"x": 1}, event_id="nowhere")
        took = time.monotonic() - started
    assert took < 10.0  # not the 30 s timeout
    assert [ack.event_id for ack in batch.acks] == ["small"]
    errors = dict(batch.failures)
    assert set(errors) == {"large", "nowhere"}, batch.failures
    assert errors["large"].startswith(f"publish to {SUBJECT} failed: ")
    assert "err_code 10054" in errors["large"]  # the server's reason, as before
    nowhere = "events.nowhere.to.go.v1"
    assert errors["nowhere"] == str(publish_error(nowhere, NoRespondersError()))
    assert batch.retried == 0


async def test_a_stream_that_never_gets_a_leader_fails_after_the_timeout(
    nats_cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two of three nodes stop: the R3 stream has no quorum, so no leader, for good.
    The batch retries for its timeout (3 s), then reports every event, and returns."""
    monkeypatch.setenv("MESH_REPLICAS", "3")
    survivor, *stopped = nats_cluster.nodes
    async with connect([survivor.url]) as client:
        await r3_stream(client)
        for node in stopped:
            await anyio.to_thread.run_sync(node.stop)
        batch = client.batch(timeout=3.0)
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"50 event\(s\) not stored"):
            async with batch:
                for i in range(50):
                    await batch.publish(EVENT, OrderCreated(f"o-{i}", i), event_id=f"e-{i}")
        took = time.monotonic() - started
    print(f"no leader: failed after {took:.2f} s, {batch.retried} sent again")
    assert 2.5 <= took < 15.0  # retried until the timeout, then gave up (not hanging)
    assert not batch.acks and len(batch.failures) == 50
    assert {event_id for event_id, _ in batch.failures} == {f"e-{i}" for i in range(50)}
    for _, error in batch.failures:
        assert "attempt(s) in 3 s" in error and "same event id" in error, error
    assert batch.retried > 0
