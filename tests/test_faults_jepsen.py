"""Jepsen-style faults (issue 17): pauses, partitions, full disks, slow links, killed publishers.

Jepsen's NATS 2.12.1 analysis used a wider nemesis than crashes: process pauses
(SIGSTOP), network partitions, disk faults and slow links. Each test here injects one
of them into real processes on loopback (`tests/faultkit.py`), counts what was published
(acknowledged by JetStream), handled, lost and handled twice, prints one `figures:` line
and merges its figures into `tests/fault_figures.json` (the README's table comes from
there). A nemesis that needs what this machine lacks (root, iptables, a tmpfs) skips
with the reason.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import pytest
from faultkit import (
    EVENT,
    HERE,
    KV_STREAM,
    LEDGER_DURABLE,
    ROOT,
    STREAM,
    ConsumerProcess,
    DelayProxy,
    OrderCreated,
    PartitionableCluster,
    Traffic,
    consumer_info,
    count_lines,
    fill,
    lines,
    move_leader,
    partition,
    paused,
    publish_batch,
    record_figures,
    run_figures,
    stats_of,
    tmpfs,
    wait_for_r3_placement,
    why_not_iptables,
    why_not_tmpfs,
)

from framework import (
    Client,
    Context,
    DeadlineExceeded,
    PublishError,
    Service,
    StreamUnavailable,
    connect,
)
from framework.dev.devserver import NatsServer, free_port
from framework.streams import Stream, ensure_streams
from framework.testing import eventually as wait_until

pytestmark = pytest.mark.slow

ACK_WAIT = 2.0
IN_FLIGHT = 16
ROUTE_PING = 2.0  # the cluster's route ping interval, as in nats-cluster/*.conf


async def drained(client: Any) -> bool:
    """Nothing pending or unacknowledged: no more handler runs will come."""
    info = await consumer_info(client)
    return info.num_pending == 0 and info.num_ack_pending == 0


# -- a consumer process paused past ack_wait --------------------------------------------


@pytest.mark.parametrize("replicas", [1, 2])
async def test_consumer_paused_past_ack_wait_runs_no_handler_twice_in_one_process(
    nats_server: NatsServer, client: Any, tmp_path: Path, replicas: int
) -> None:
    """SIGSTOP a consumer 6 s (ack_wait 2 s, handler 0.5 s, 16 in flight), then SIGCONT.

    One replica: nothing may run twice; the process itself holds every redelivery of
    an event it has in flight or settling. Two replicas: the other one takes over what
    the paused one held past ack_wait, so at most those (its in-flight events) run twice.
    """
    total, pause = 400, 6.0
    await ensure_streams(client, [], [EVENT])
    options = ("--max-concurrency", str(IN_FLIGHT), "--ack-wait", str(ACK_WAIT), "--sleep", "0.5")
    consumers = [
        ConsumerProcess(nats_server.url, tmp_path / f"ledger{n}", *options, "--no-effects")
        for n in range(replicas)
    ]
    victim = consumers[0]
    for consumer in consumers:
        consumer.start()
    try:
        assert await publish_batch(client, range(total)) == total
        await wait_until(lambda: count_lines(victim.attempts) >= 3 * IN_FLIGHT, 60, "a start")
        victim.assert_alive()
        before = count_lines(victim.attempts)
        with paused(victim.pid):
            await anyio.sleep(pause)
        resumed_at = time.monotonic()

        def handled() -> set[str]:
            return {i for c in consumers for i in lines(c.attempts)}

        await wait_until(lambda: len(handled()) >= total, 90, "every event handled")
        await wait_until(lambda: drained(client), 30, "consumer drained", interval=0.1)
        caught_up_s = time.monotonic() - resumed_at
        for consumer in consumers:
            consumer.assert_alive()
    finally:
        for consumer in consumers:
            consumer.stop()

    runs = Counter(i for c in consumers for i in lines(c.attempts))
    in_victim = Counter(lines(victim.attempts))
    expected = {f"e-{i}" for i in range(total)}
    twice = sum(n - 1 for n in runs.values())
    record_figures(
        f"consumer_paused_{replicas}_replica{'s' if replicas > 1 else ''}",
        published=total,
        handled=len(set(runs) & expected),
        lost=len(expected - set(runs)),
        handler_runs_twice=twice,
        twice_in_the_paused_process=sum(n - 1 for n in in_victim.values()),
        in_flight=IN_FLIGHT,
        paused_s=pause,
        ack_wait_s=ACK_WAIT,
        handled_before_pause=before,
        drained_after_resume_s=round(caught_up_s, 1),
    )
    assert set(runs) == expected
    # The paused process never runs an event twice itself...
    assert all(n == 1 for n in in_victim.values()), in_victim.most_common(3)
    if replicas == 1:
        assert twice == 0
    else:  # ...the other replica re-runs at most what the paused one had in flight
        assert twice <= IN_FLIGHT


# -- the server paused past ack_wait ------------------------------------------------------


def slow_ledger(handled: list[str], sleep: float) -> Service:
    ledger = Service("ledger")

    @ledger.subscribe(EVENT, ack_wait=ACK_WAIT, backoff=[0.2], max_concurrency=IN_FLIGHT)
    async def on_order_created(event: OrderCreated, ctx: Context) -> None:
        handled.append(ctx.event_id or "")
        await anyio.sleep(sleep)

    return ledger


async def test_server_paused_past_ack_wait_loses_nothing_and_runs_nothing_twice(
    nats_server: NatsServer, client: Any
) -> None:
    """SIGSTOP the server 5 s mid-stream: clients see nothing but silence, then it resumes,
    with every ack_wait timer expired at once."""
    total, pause = 1500, 5.0
    handled: list[str] = []
    traffic = Traffic(client, total)
    async with slow_ledger(handled, 0.02).serve(nats_server.url):
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic.publish_loop)
            await wait_until(lambda: len(traffic.acked) >= total // 3, 30, "a third published")
            assert nats_server.pid is not None
            fault_at = time.monotonic()
            with paused(nats_server.pid):
                await anyio.sleep(pause)
            await wait_until(lambda: traffic.done.is_set(), 60, "all events published")
        expected = set(traffic.acked)
        await wait_until(lambda: expected <= set(handled), 30, "every acked event handled")
        await wait_until(lambda: drained(client), 30, "consumer drained", interval=0.1)
        info = await client.js.stream_info("EVENTS_ORDER")

    runs = Counter(handled)
    record_figures(
        "server_paused",
        published=len(traffic.acked),
        stored=info.state.messages,
        handled=len(set(handled)),
        lost=len(expected - set(handled)),
        handler_runs_twice=sum(n - 1 for n in runs.values()),
        paused_s=pause,
        ack_wait_s=ACK_WAIT,
        publish_retries=sum(traffic.publish_failures.values()),
        publish_gap_s=traffic.longest_gap(traffic.ack_times, fault_at),
    )
    assert len(traffic.acked) == total
    assert expected <= set(handled)
    assert info.state.messages == total
    assert sum(n - 1 for n in runs.values()) == 0, runs.most_common(3)


# -- one node of a 3-node cluster partitioned from the others -------------------------------


class SidePublisher:
    """Publishes `<prefix>-<n>` events one at a time, retrying each (same id) until
    acknowledged; records every error with its class, message and time."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.acked: list[str] = []
        self.ack_times: list[float] = []
        self.errors: list[tuple[float, str, str]] = []
        self.stop = anyio.Event()

    async def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            event_id = f"{self.prefix}-{n}"
            while not self.stop.is_set():
                try:
                    await self.client.publish(
                        EVENT, OrderCreated(event_id, n), event_id=event_id, timeout=2.0
                    )
                except PublishError as exc:
                    self.errors.append((time.monotonic(), type(exc).__name__, str(exc)))
                    await anyio.sleep(0.1)
                    continue
                self.acked.append(event_id)
                self.ack_times.append(time.monotonic())
                n += 1
                break
            await anyio.sleep(0.02)

    def first_ack_after(self, moment: float) -> float | None:
        later = [t for t in self.ack_times if t > moment]
        return round(later[0] - moment, 2) if later else None


def recording_ledger(handled: list[tuple[str, str]], replica: str) -> Service:
    ledger = Service("ledger")

    @ledger.subscribe(EVENT, ack_wait=ACK_WAIT, backoff=[0.2], max_concurrency=IN_FLIGHT)
    async def on_order_created(event: OrderCreated, ctx: Context) -> None:
        handled.append((replica, ctx.event_id or ""))
        await anyio.sleep(0.02)

    return ledger


async def test_partitioned_node_loses_nothing_and_its_publishers_get_retryable_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n1 (leading the stream, the marker bucket and the consumer) is cut off from n2 and
    n3 for 15 s by iptables, while a publisher and a consumer replica sit on each side."""
    if reason := why_not_iptables():
        pytest.skip(f"cannot partition a node here: {reason}")
    monkeypatch.setenv("MESH_REPLICAS", "3")
    partition_s = 15.0
    cluster = PartitionableCluster(tmp_path / "cluster", route_ping=ROUTE_PING)
    handled: list[tuple[str, str]] = []
    try:
        await cluster.start()
        n1, n2 = cluster.nodes[0], cluster.nodes[1]
        async with AsyncExitStack() as stack:
            isolated = await stack.enter_async_context(connect([n1.url], name="isolated"))
            healthy = await stack.enter_async_context(connect([n2.url], name="healthy"))
            await wait_for_r3_placement(healthy)
            for node, replica in ((n1, "isolated"), (n2, "healthy")):
                services = await Client.open([node.url], name=f"ledger-{replica}")
                stack.push_async_callback(services.close)
                await stack.enter_async_context(recording_ledger(handled, replica).serve(services))
            for api in (
                f"STREAM.LEADER.STEPDOWN.{STREAM}",
                f"STREAM.LEADER.STEPDOWN.{KV_STREAM}",
                f"CONSUMER.LEADER.STEPDOWN.{STREAM}.{LEDGER_DURABLE}",
            ):
                await move_leader(healthy, api, "n1")
            leaders = await _leaders(healthy)
            sides = [SidePublisher(isolated, "iso"), SidePublisher(healthy, "ok")]
            async with anyio.create_task_group() as tg:
                for side in sides:
                    tg.start_soon(side.run)
                await wait_until(lambda: all(len(s.acked) >= 100 for s in sides), 60, "traffic")
                cut_at = time.monotonic()
                with partition(cluster):
                    await anyio.sleep(partition_s)
                healed_at = time.monotonic()
                await wait_until(
                    lambda: all(s.first_ack_after(healed_at + 1) is not None for s in sides),
                    60,
                    lambda: (
                        "recovery: "
                        + "; ".join(
                            f"{s.prefix}: {len(s.acked)} acked, {s.errors[-1:]}" for s in sides
                        )
                    ),
                )
                for side in sides:
                    side.stop.set()
            expected = {i for s in sides for i in s.acked}
            await wait_until(
                lambda: expected <= {i for _, i in handled}, 60, "every acked event handled"
            )
            await wait_until(lambda: drained(healthy), 60, "consumer drained", interval=0.2)
    finally:
        cluster.cleanup()

    iso, ok = sides
    during = [e for e in iso.errors if cut_at <= e[0] <= healed_at]
    runs = Counter(i for _, i in handled)
    record_figures(
        "partition_one_node",
        published=len(expected),
        **run_figures(expected, runs),
        partition_s=partition_s,
        cut_off_node_led=leaders,
        isolated_publish_errors=dict(Counter(kind for _, kind, _ in iso.errors)),
        isolated_first_error=during[0][2] if during else None,
        healthy_publish_errors=dict(Counter(kind for _, kind, _ in ok.errors)),
        healthy_publish_gap_s=_longest_gap(ok.ack_times, cut_at),
        route_ping_s=ROUTE_PING,
        isolated_recovered_after_heal_s=iso.first_ack_after(healed_at),
        healthy_recovered_after_heal_s=ok.first_ack_after(healed_at),
    )
    assert not expected - set(runs), "acknowledged events lost"
    assert sum(n - 1 for n in runs.values()) <= IN_FLIGHT  # the cut-off replica's in flight
    assert during, "the isolated publisher saw no error during the partition"
    # retryable errors that say so, never NoStream (the stream exists all along)
    assert {kind for _, kind, _ in iso.errors + ok.errors} <= {StreamUnavailable.__name__}
    assert StreamUnavailable.retryable
    assert all("retry" in text for _, _, text in during), during[0]
    recovered = iso.first_ack_after(healed_at)
    assert recovered is not None and recovered < 15.0


async def _leaders(client: Any) -> dict[str, str]:
    stream = await client.js.stream_info(STREAM)
    kv = await client.js.stream_info(KV_STREAM)
    consumer = await consumer_info(client)
    return {
        "stream": stream.cluster.leader,
        "markers": kv.cluster.leader,
        "consumer": consumer.cluster.leader,
    }


def _longest_gap(times: list[float], since: float) -> float:
    later = [since, *(t for t in times if t > since)]
    return round(max(b - a for a, b in itertools.pairwise(later)), 2) if len(later) > 1 else 0.0


# -- the server's store fills up, then is freed ------------------------------------------------


FILLER = Stream("FILLER", ["filler.>"], description="takes the store's space")


async def fill_store(client: Any) -> str:
    """Store 60 kB messages until JetStream refuses one; its error, in its words."""
    chunk = b"x" * 60_000
    for _ in range(5000):
        reply = await client.nc.request("filler.x", chunk, timeout=5.0)
        if b'"error"' in reply.data:
            return str(json.loads(reply.data)["error"])
    raise AssertionError("the store never filled up")


def log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of a consumer process whose `event` is `event`."""
    found = []
    for line in lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


async def test_full_store_refuses_publishes_at_once_and_the_stuck_consumer_warns_then_recovers(
    tmp_path: Path,
) -> None:
    """The server's store, a 64 MB tmpfs, fills up (JetStream's own limit: 75 % of the disk
    it found): publishes fail at once with the server's reason; a consumer whose markers
    cannot be stored warns within 10 s and shows it in $SRV.STATS; once space is freed
    (the filler stream purged) both go on, with no restart of anything."""
    if reason := why_not_tmpfs():
        pytest.skip(f"cannot fill a store here: {reason}")
    total = 200
    with tmpfs(tmp_path / "store", 64) as store:
        server = NatsServer(store_dir=store / "js", log_file=tmp_path / "nats.log")
        with server:
            async with connect(server.url) as client:
                await ensure_streams(client, [FILLER], [EVENT])
                consumer = ConsumerProcess(
                    server.url,
                    tmp_path / "ledger",
                    *("--max-concurrency", str(IN_FLIGHT), "--ack-wait", str(ACK_WAIT)),
                    *("--sleep", "0.01", "--no-effects"),
                )
                consumer.start()
                try:
                    await stats_of(client, "ledger")  # its consumer and bucket exist
                    with paused(consumer.pid):  # the events wait until the store is full
                        assert await publish_batch(client, range(total)) == total
                        fill_error = await fill_store(client)
                        started = time.monotonic()
                        with pytest.raises(PublishError) as refused:
                            await client.publish(EVENT, OrderCreated("late", 1), event_id="late")
                        refused_after = time.monotonic() - started
                    resumed = time.monotonic()
                    await wait_until(
                        lambda: log_lines(consumer.log, "subscriber stalled"), 15, "a warning"
                    )
                    warned_after = time.monotonic() - resumed
                    stalled = (await stats_of(client, "ledger")).endpoints[0].data
                    freed = time.monotonic()
                    await client.js.purge_stream("FILLER")
                    later = await client.publish(EVENT, OrderCreated("later", 2), event_id="later")
                    expected = {f"e-{i}" for i in range(total)} | {"later"}
                    await wait_until(
                        lambda: expected <= set(lines(consumer.attempts)), 60, "all handled"
                    )
                    await wait_until(lambda: drained(client), 60, "drained", interval=0.2)
                    recovered_after = time.monotonic() - freed
                    healthy = (await stats_of(client, "ledger")).endpoints[0].data
                    consumer.assert_alive()
                finally:
                    consumer.stop()

    runs = Counter(lines(consumer.attempts))
    record_figures(
        "store_full",
        published=total + 1,
        **run_figures(expected, runs),
        server_said=fill_error,
        publish_error=str(refused.value),
        publish_refused_after_s=round(refused_after, 3),
        consumer_warned_after_s=round(warned_after, 1),
        stall_reason=stalled["stall_reason"],
        recovered_after_free_s=round(recovered_after, 1),
    )
    assert "insufficient resources" in fill_error
    assert "no storage left" in str(refused.value)
    assert refused_after < 1.0  # the server said why: no wait for a timeout
    assert warned_after < 10.0
    assert stalled["stalled_since"] and "insufficient resources" in stalled["stall_reason"]
    assert later.seq > 0 and not expected - set(runs)
    assert healthy["stalled_since"] is None and healthy["stalls"] >= 1
    assert log_lines(consumer.log, "subscriber resumed")


async def test_disk_filled_behind_the_servers_back_needs_a_server_restart_not_a_service_one(
    tmp_path: Path,
) -> None:
    """Something else fills the disk under a JetStream limit that would allow more: the
    server's write fails with ENOSPC, and nats-server keeps that stream's write error
    (its log: "Critical write error ... no space left on device") and stops answering
    its publishes until it is restarted. The consumer warns; once space is freed and the
    server restarted, services go on without a restart of their own."""
    if reason := why_not_tmpfs():
        pytest.skip(f"cannot fill a disk here: {reason}")
    total = 100
    with tmpfs(tmp_path / "store", 64) as store:
        config = tmp_path / "nats.conf"
        config.write_text("jetstream { max_file_store: 1GB }\n")  # more than the disk
        server = NatsServer(
            store_dir=store / "js", config_file=config, log_file=tmp_path / "nats.log"
        )
        with server:
            async with connect(server.url) as client:
                await ensure_streams(client, [], [EVENT])
                consumer = ConsumerProcess(
                    server.url,
                    tmp_path / "ledger",
                    *("--max-concurrency", str(IN_FLIGHT), "--ack-wait", str(ACK_WAIT)),
                    *("--sleep", "0.01", "--no-effects"),
                )
                consumer.start()
                try:
                    ids_before = {(await stats_of(client, "ledger")).id}
                    assert await publish_batch(client, range(total)) == total
                    await wait_until(lambda: count_lines(consumer.attempts) >= total, 30, "all")
                    filler = fill(store)
                    extra, refused_after, refused = 0, 0.0, None
                    while refused is None:  # what fits in the blocks' last pages still goes
                        assert extra < 5000, "the full disk took every publish"
                        started = time.monotonic()
                        try:
                            await client.publish(
                                EVENT, OrderCreated(f"x-{extra}", 1), event_id=f"x-{extra}"
                            )
                            extra += 1
                        except PublishError as exc:
                            refused, refused_after = exc, time.monotonic() - started
                    await wait_until(
                        lambda: "no space left on device" in server.log_tail(200), 10, "ENOSPC"
                    )
                    server_said = next(
                        line[line.index("Filestore") :]
                        for line in server.log_tail(200).splitlines()
                        if "Critical write error" in line
                    ).replace(str(store), "<store>")
                    filler.unlink()
                    with pytest.raises(PublishError):  # freed, yet the stream stays broken
                        await client.publish(EVENT, OrderCreated("y", 2), event_id="y", timeout=2)
                    restarted = time.monotonic()
                    await anyio.to_thread.run_sync(server.restart)
                    later = await client.publish(EVENT, OrderCreated("z", 3), event_id="z")
                    expected = {f"e-{i}" for i in range(total)} | {"z"}
                    expected |= {f"x-{i}" for i in range(extra)}
                    await wait_until(
                        lambda: expected <= set(lines(consumer.attempts)), 60, "handled again"
                    )
                    recovered_after = time.monotonic() - restarted
                    ids_after = {(await stats_of(client, "ledger")).id}
                    consumer.assert_alive()
                finally:
                    consumer.stop()

    runs = Counter(lines(consumer.attempts))
    record_figures(
        "disk_full_enospc",
        published=len(expected),
        **run_figures(expected, runs),
        server_said=server_said,
        publish_error=str(refused),
        publish_failed_after_s=round(refused_after, 1),
        recovered_after_server_restart_s=round(recovered_after, 1),
    )
    assert "no space left on device" in server_said
    assert later.seq > 0 and not expected - set(runs)
    assert sum(n - 1 for n in runs.values()) == 0
    assert ids_after == ids_before  # the service was not restarted


# -- slow links: 100 ms added each way between every client and the server ---------------------


class Nap(msgspec.Struct):
    seconds: float


def slow_link_services(handled: list[str], deadlines: list[float | None]) -> list[Service]:
    orders = Service("orders", publishes=[EVENT])

    @orders.rpc()
    async def echo(req: Nap) -> Nap:
        return req

    @orders.rpc()
    async def relay(req: Nap, ctx: Context) -> Nap:
        reply: Nap = await ctx.call("orders.nap", req, returns=Nap)  # the deadline goes on
        return reply

    @orders.rpc()
    async def nap(req: Nap, ctx: Context) -> Nap:
        deadlines.append(ctx.remaining())
        await anyio.sleep(req.seconds)
        return req

    return [orders, slow_ledger(handled, 0.01)]


async def test_slow_links_lose_nothing_and_deadlines_hold(nats_server: NatsServer) -> None:
    delay, total, singles = 0.1, 500, 20
    handled: list[str] = []
    deadlines: list[float | None] = []
    async with DelayProxy(nats_server.port, delay) as proxy, AsyncExitStack() as stack:
        client = await stack.enter_async_context(connect(proxy.url))
        for service in slow_link_services(handled, deadlines):
            await stack.enter_async_context(service.serve(proxy.url))
        started = time.monotonic()
        await client.call("orders.echo", Nap(0), returns=Nap, timeout=5.0)
        rtt = time.monotonic() - started
        assert await publish_batch(client, range(total)) == total
        for i in range(singles):
            await client.publish(EVENT, OrderCreated(f"s-{i}", i), event_id=f"s-{i}")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.call("orders.relay", Nap(3.0), returns=Nap, timeout=1.0)
        deadline_s = time.monotonic() - started
        expected = {f"e-{i}" for i in range(total)} | {f"s-{i}" for i in range(singles)}
        await wait_until(lambda: expected <= set(handled), 60, "every event handled")
        await wait_until(lambda: drained(client), 30, "consumer drained", interval=0.2)

    runs = Counter(handled)
    record_figures(
        "slow_links_100ms",
        published=len(expected),
        **run_figures(expected, runs),
        added_latency_each_way_s=delay,
        rpc_round_trip_s=round(rtt, 3),
        deadline_1s_raised_after_s=round(deadline_s, 2),
        remaining_at_the_second_hop_s=round(deadlines[0], 2) if deadlines[0] else None,
    )
    assert rtt >= 4 * delay  # the request and its reply each crossed two slow links
    assert not expected - set(runs)
    assert sum(n - 1 for n in runs.values()) == 0
    assert 1.0 <= deadline_s < 1.0 + 4 * delay + 0.5  # the caller's deadline, not the nap's
    assert deadlines and deadlines[0] is not None and deadlines[0] < 1.0  # passed on, spent


# -- a publisher killed mid-batch, restarted with the same ids ----------------------------------


async def test_publisher_killed_mid_batch_and_restarted_with_the_same_ids_stores_each_once(
    nats_server: NatsServer, client: Any, tmp_path: Path
) -> None:
    total = 3000
    handled: list[str] = []
    acked = tmp_path / "acked.log"
    command = [sys.executable, str(HERE / "batch_publisher.py"), "--url", nats_server.url]
    command += ["--acked", str(acked), "--total", str(total)]
    async with slow_ledger(handled, 0.0).serve(nats_server.url):
        first = subprocess.Popen(command, cwd=ROOT)
        try:
            await wait_until(lambda: count_lines(acked) >= total // 3, 60, "a third acked")
        finally:
            first.kill()  # SIGKILL: a batch is in flight, its acks never read
            first.wait(10)
        acked_before_kill = count_lines(acked)
        stored_at_kill = (await client.js.stream_info(STREAM)).state.messages
        second = await anyio.run_process(command, cwd=ROOT, check=False)
        assert second.returncode == 0, second.stderr
        expected = {f"e-{i}" for i in range(total)}
        await wait_until(lambda: expected <= set(handled), 60, "every event handled")
        await wait_until(lambda: drained(client), 30, "consumer drained", interval=0.2)
        info = await client.js.stream_info(STREAM)

    runs = Counter(handled)
    record_figures(
        "publisher_killed_mid_batch",
        published=total,
        acked_before_kill=acked_before_kill,
        stored_at_kill=stored_at_kill,
        stored_but_never_acked_to_it=stored_at_kill - acked_before_kill,
        stored=info.state.messages,
        **run_figures(expected, runs),
    )
    assert acked_before_kill < total  # killed mid-way
    assert info.state.messages == total  # the restart's duplicates were deduplicated
    assert set(runs) == expected
    assert sum(n - 1 for n in runs.values()) == 0


# -- the sample shop with a service paused past its ack_wait ------------------------------------


async def test_shop_with_payments_paused_past_ack_wait_charges_once_and_notifies_once(
    tmp_path: Path,
) -> None:
    """`mesh up`'s shop (orders, payments, notifications); payments is SIGSTOPped for 35 s,
    past its 30 s ack_wait, while orders keep coming; then it resumes."""
    from test_mesh_e2e import DECLINED_EVERY, MeshProcess, _request

    from services.contracts import GetOrder, Order

    orders_total, pause = 30, 35.0
    port = free_port()
    mesh = MeshProcess(tmp_path, port)
    url = f"nats://127.0.0.1:{port}"
    try:
        await wait_until(lambda: mesh.said("mesh: ready"), 60, "mesh ready")
        placed: list[Order] = []
        async with connect(url) as client:
            for n in range(orders_total // 3):
                placed.append(await client.call("orders.create", _request(n), returns=Order))
            with paused(mesh.child("payments")):
                for n in range(orders_total // 3, orders_total):
                    placed.append(await client.call("orders.create", _request(n), returns=Order))
                await anyio.sleep(pause)
            final: dict[str, str] = {}

            async def all_final() -> bool:
                for order in placed:
                    if order.id not in final:
                        now = await client.call("orders.get", GetOrder(order.id), returns=Order)
                        if now.status in ("confirmed", "cancelled"):
                            final[order.id] = now.status
                return len(final) == len(placed)

            await wait_until(all_final, 120, "every order final", interval=0.3)
        await wait_until(
            lambda: count_lines(mesh.outbox) >= orders_total, 30, "every customer notified"
        )
        await anyio.sleep(1.0)  # anything sent twice would have arrived by now
    finally:
        assert mesh.stop() == 0

    expected = {
        order.id: "cancelled" if n % DECLINED_EVERY == 0 else "confirmed"
        for n, order in enumerate(placed)
    }
    notes = Counter(json.loads(line)["order_id"] for line in lines(mesh.outbox))
    charges = [json.loads(line) for line in lines(mesh.ledger)]
    keys: dict[str, set[str]] = {}
    for charge in charges:
        keys.setdefault(charge["order_id"], set()).add(charge["key"])
    record_figures(
        "shop_payments_paused",
        published=orders_total,
        handled=len(final),
        lost=orders_total - len(final),
        paused_s=pause,
        ack_wait_s=30.0,
        provider_charge_calls=len(charges),
        orders_charged_twice=sum(len(k) > 1 for k in keys.values()),
        customers_notified_twice=sum(n > 1 for n in notes.values()),
    )
    assert final == expected
    assert all(len(k) == 1 for k in keys.values()), keys
    assert set(notes) == set(expected) and set(notes.values()) == {1}, notes
