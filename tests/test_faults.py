"""Fault tests: crashes, server restarts, node loss, backlogs and hanging handlers.

Each test counts what was published (acknowledged by JetStream), handled and lost,
prints one `figures:` line and merges its figures into `tests/fault_figures.json`
(the README's fault table is pasted from there).
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from faultkit import (
    EVENT,
    KV_STREAM,
    LEDGER_DURABLE,
    ROOT,
    STREAM,
    ConsumerProcess,
    OrderCreated,
    Traffic,
    consumer_info,
    count_lines,
    instance_ids,
    lines,
    mesh_services,
    move_leader,
    publish_batch,
    record_figures,
    rss_kb,
    stats_of,
    wait_for_r3_placement,
)

from framework import Client, Context, Service, connect, list_dead_letters
from framework.dev.devserver import NatsServer, free_port, wait_jetstream_ready
from framework.events.options import SubscribeOptions
from framework.streams import ensure_streams
from framework.testing import eventually as wait_until

# -- 1. a consumer process killed mid-stream ------------------------------------------


@pytest.mark.slow
async def test_sigkill_consumer_mid_stream_loses_nothing_and_applies_each_effect_once(
    nats_server: NatsServer, client: Any, tmp_path: Path
) -> None:
    total, max_concurrency = 10_000, 16
    bound = SubscribeOptions(max_concurrency=max_concurrency).unsettled_limit
    await ensure_streams(client, [], [EVENT])
    consumer = ConsumerProcess(
        nats_server.url,
        tmp_path / "ledger",
        "--max-concurrency",
        str(max_concurrency),
        "--ack-wait",
        "3",
        "--sleep",
        "0.002",
    )
    consumer.start()
    try:
        async with anyio.create_task_group() as tg:
            published: list[int] = []

            async def publish_all() -> None:
                published.append(await publish_batch(client, range(total)))

            tg.start_soon(publish_all)
            await wait_until(
                lambda: count_lines(consumer.attempts) >= total * 0.3, 60, "30% handled"
            )
            consumer.assert_alive()
            consumer.kill()
            killed_at = count_lines(consumer.attempts)
            restarted = time.monotonic()
            consumer.start()
            await wait_until(
                lambda: count_lines(consumer.attempts) > killed_at, 30, "first event after restart"
            )
            resumed_after = time.monotonic() - restarted
        assert published == [total]

        await wait_until(lambda: count_lines(consumer.effects) >= total, 90, "all effects")

        # Quiet: nothing left pending or unacknowledged, so no more handler runs come.
        async def drained() -> bool:
            info = await consumer_info(client)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_until(drained, 30, "consumer drained", interval=0.1)
        consumer.assert_alive()
        redelivered = (await stats_of(client, "ledger")).endpoints[0].data["redelivered"]
    finally:
        consumer.stop()

    attempts = Counter(lines(consumer.attempts))
    effects = Counter(lines(consumer.effects))
    expected = {f"e-{i}" for i in range(total)}
    handled = set(attempts)
    lost = expected - handled
    duplicated_runs = sum(n - 1 for n in attempts.values())
    record_figures(
        "consumer_sigkill",
        published=total,
        handled=len(handled & expected),
        lost=len(lost),
        killed_after_handler_runs=killed_at,
        handler_runs=sum(attempts.values()),
        handler_runs_twice=duplicated_runs,
        max_concurrency=max_concurrency,
        max_unsettled=bound,
        effects_applied=sum(effects.values()),
        effects_applied_twice=sum(n - 1 for n in effects.values()),
        redelivered_after_restart=redelivered,
        resumed_after_restart_s=round(resumed_after, 2),
    )
    assert not lost, f"{len(lost)} acknowledged events never handled, e.g. {sorted(lost)[:5]}"
    assert handled == expected
    # Idempotency marks after the handler: only what was unsettled at the kill reruns,
    # at most the documented bound (`max_unsettled`, by default 8 * max_concurrency).
    assert duplicated_runs <= bound
    # The business-key check in the handler makes every effect exact.
    assert set(effects) == {f"o-{i}" for i in range(total)}
    assert sum(effects.values()) == total


# -- 2. the single server restarted mid-stream ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["restart", "kill"])
async def test_server_restart_mid_stream_loses_no_acknowledged_event(
    nats_server: NatsServer, client: Any, how: str
) -> None:
    """`restart`: SIGTERM then start; `kill`: SIGKILL (a crash) then start, same store."""
    total = 3000
    handled: list[str] = []
    orders, ledger = mesh_services(handled)
    traffic = Traffic(client, total)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(orders.serve(nats_server.url))
        await stack.enter_async_context(ledger.serve(nats_server.url))
        ids_before = await instance_ids(client)
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic.publish_loop)
            tg.start_soon(traffic.rpc_loop)
            await wait_until(lambda: len(traffic.acked) >= total // 3, 30, "a third published")
            fault_at = time.monotonic()
            if how == "kill":
                await anyio.to_thread.run_sync(nats_server.kill)
            else:
                await anyio.to_thread.run_sync(nats_server.stop)
            await anyio.to_thread.run_sync(nats_server.start)
            back_at = time.monotonic()
            await wait_until(
                lambda: traffic.done.is_set(),
                60,
                lambda: (
                    f"all events published: {len(traffic.acked)} acked, "
                    f"publish failures {dict(traffic.publish_failures)}"
                ),
            )
        expected = set(traffic.acked)
        await wait_until(lambda: expected <= set(handled), 30, "every acked event handled")
        ids_after = await instance_ids(client)
        info = await client.js.stream_info(STREAM)

    lost = expected - set(handled)
    record_figures(
        f"server_{how}",
        published=len(traffic.acked),
        stored=info.state.messages,
        handled=len(set(handled)),
        lost=len(lost),
        handler_runs_twice=len(handled) - len(set(handled)),
        publish_retries=sum(traffic.publish_failures.values()),
        duplicate_acks=traffic.duplicate_acks,
        server_down_s=round(back_at - fault_at, 2),
        rpc_ok=len(traffic.rpc_ok),
        rpc_failed=sum(traffic.rpc_failures.values()),
        rpc_gap_s=traffic.longest_gap(traffic.rpc_ok, fault_at),
        publish_gap_s=traffic.longest_gap(traffic.ack_times, fault_at),
    )
    assert len(traffic.acked) == total
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:5]}"
    assert info.state.messages == total  # retried publishes deduplicated by event id
    assert ids_after == ids_before  # the same service instances: nobody restarted them
    assert traffic.first_after(traffic.rpc_ok, back_at) is not None  # RPC works again


# -- 3. one node of a 3-node cluster killed mid-stream ---------------------------------------


@pytest.mark.slow
async def test_cluster_node_loss_mid_stream_and_catch_up(
    nats_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_REPLICAS", "3")
    total = 1500
    handled: list[str] = []
    orders, ledger = mesh_services(handled)
    # Everything starts on n1 (services, the caller, the stream and consumer leaders), and
    # n1 is the node that dies: the worst case, every part has to fail over.
    victim = nats_cluster.nodes[0]
    urls = [victim.url, *(node.url for node in nats_cluster.nodes[1:])]
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(connect(urls, dont_randomize=True))
        await wait_for_r3_placement(client)
        services = await Client.open(urls, name="mesh", dont_randomize=True)
        stack.push_async_callback(services.close)
        await stack.enter_async_context(orders.serve(services))
        await stack.enter_async_context(ledger.serve(services))
        traffic = Traffic(client, total)
        ids_before = await instance_ids(client)
        stream = await client.js.stream_info(STREAM)
        assert stream.config.num_replicas == 3
        kv = await client.js.stream_info(KV_STREAM)
        assert kv.config.num_replicas == 3
        for api in (
            f"STREAM.LEADER.STEPDOWN.{STREAM}",
            f"STREAM.LEADER.STEPDOWN.{KV_STREAM}",
            f"CONSUMER.LEADER.STEPDOWN.{STREAM}.{LEDGER_DURABLE}",
        ):
            await move_leader(client, api, victim.server_name)
        assert client.nc.connected_url.port == services.nc.connected_url.port == victim.port

        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic.publish_loop)
            tg.start_soon(traffic.rpc_loop)
            await wait_until(lambda: len(traffic.acked) >= total // 3, 60, "a third published")
            stream = await client.js.stream_info(STREAM)
            consumer = await consumer_info(client)
            leaders = {
                "stream": stream.cluster.leader == victim.server_name,
                "consumer": consumer.cluster.leader == victim.server_name,
            }
            fault_at = time.monotonic()
            await anyio.to_thread.run_sync(victim.kill)
            acked_at_fault = len(traffic.acked)
            await wait_until(
                lambda: len(traffic.acked) > acked_at_fault + 50, 60, "publishing resumed"
            )
            await wait_until(
                lambda: traffic.first_after(traffic.rpc_ok, fault_at) is not None, 30, "RPC back"
            )
            await wait_until(lambda: traffic.done.is_set(), 90, "all events published")
        expected = set(traffic.acked)
        await wait_until(lambda: expected <= set(handled), 60, "every acked event handled")
        handled_before_rejoin = len(set(handled))
        ids_after = await instance_ids(client)
        reconnected_to = services.nc.connected_url.port

        # Bring the node back: it must catch up on everything it missed.
        rejoin_at = time.monotonic()
        await anyio.to_thread.run_sync(victim.start)

        async def caught_up(name: str) -> bool:
            info = await client.js.stream_info(name)
            peers = [info.cluster.leader, *(r.name for r in info.cluster.replicas or [])]
            return victim.server_name in peers and all(
                r.current and not r.offline and not r.lag for r in info.cluster.replicas or []
            )

        async def all_caught_up() -> bool:
            return await caught_up(STREAM) and await caught_up(KV_STREAM)

        await wait_until(all_caught_up, 60, "the rejoined node to catch up", interval=0.2)
        caught_up_s = time.monotonic() - rejoin_at
        final = await client.js.stream_info(STREAM)

    lost = expected - set(handled)
    record_figures(
        "cluster_node_kill",
        published=len(traffic.acked),
        stored=final.state.messages,
        handled=handled_before_rejoin,
        lost=len(lost),
        handler_runs_twice=len(handled) - len(set(handled)),
        killed_node_led_stream=leaders["stream"],
        killed_node_led_consumer=leaders["consumer"],
        publish_retries=sum(traffic.publish_failures.values()),
        rpc_ok=len(traffic.rpc_ok),
        rpc_failed=sum(traffic.rpc_failures.values()),
        rpc_gap_s=traffic.longest_gap(traffic.rpc_ok, fault_at),
        publish_gap_s=traffic.longest_gap(traffic.ack_times, fault_at),
        rejoined_node_current_after_s=round(caught_up_s, 2),
    )
    assert len(traffic.acked) == total
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {sorted(lost)[:5]}"
    assert final.state.messages == total
    assert ids_after == ids_before  # services were never restarted
    assert reconnected_to != victim.port


# -- 4. a slow consumer with a large backlog --------------------------------------------------


@pytest.mark.slow
async def test_slow_consumer_with_large_backlog_has_bounded_memory_and_no_redelivery_storm(
    nats_server: NatsServer, client: Any, tmp_path: Path
) -> None:
    total, max_concurrency = 20_000, 4
    await ensure_streams(client, [], [EVENT])
    assert await publish_batch(client, range(total)) == total  # the whole backlog first
    consumer = ConsumerProcess(
        nats_server.url,
        tmp_path / "ledger",
        "--max-concurrency",
        str(max_concurrency),
        "--ack-wait",
        "5",
        "--sleep",
        "0.001",
        "--no-idempotent",  # the question here is pulling, not the KV round trips
        "--no-effects",  # no key set in the helper itself: its memory would grow
    )
    samples: list[tuple[int, int, int]] = []  # (handled, backlog, rss kB)
    max_ack_pending = 0
    consumer.start()
    try:
        await wait_until(lambda: count_lines(consumer.attempts) >= 200, 30, "consumer started")
        started = time.monotonic()
        next_mark = 0
        while (done := count_lines(consumer.attempts)) < total:
            consumer.assert_alive()
            info = await consumer_info(client)
            max_ack_pending = max(max_ack_pending, info.num_ack_pending)
            if done >= next_mark:
                samples.append(
                    (done, info.num_pending + info.num_ack_pending, rss_kb(consumer.pid))
                )
                next_mark = done + total // 8
            assert time.monotonic() - started < 120, "backlog not drained in 120s"
            await anyio.sleep(0.1)
        drain_s = time.monotonic() - started
        samples.append((count_lines(consumer.attempts), 0, rss_kb(consumer.pid)))
        data = (await stats_of(client, "ledger")).endpoints[0].data
        info = await consumer_info(client)
    finally:
        consumer.stop()

    runs = Counter(lines(consumer.attempts))
    rss = [s[2] for s in samples]
    record_figures(
        "slow_consumer_backlog",
        published=total,
        handled=len(runs),
        lost=total - len(runs),
        handler_runs_twice=sum(n - 1 for n in runs.values()),
        max_concurrency=max_concurrency,
        drain_s=round(drain_s, 1),
        rss_kb_at_backlog=[[backlog, kb] for _, backlog, kb in samples],
        rss_growth_kb=max(rss) - rss[0],
        max_ack_pending=max_ack_pending,
        redelivered=data["redelivered"],
        consumer_num_redelivered=info.num_redelivered,
    )
    assert len(runs) == total
    # Memory does not follow the backlog: from ~20,000 waiting to none, RSS stays put.
    assert max(rss) - rss[0] < 8 * 1024, samples
    # Never more taken than it can handle: the client asks for at most in flight plus one
    # batch (2 x max_concurrency); the server's count may briefly include a few acks it
    # has received but not yet processed (seen: 10-12 for 8), never the backlog.
    assert max_ack_pending <= 4 * max_concurrency
    # No redelivery storm: nothing waits long enough in the client for ack_wait to expire.
    assert data["redelivered"] <= 2 * max_concurrency
    assert info.num_redelivered <= 2 * max_concurrency


# -- 5. a handler that hangs ----------------------------------------------------------------


async def test_hanging_handler_is_cancelled_at_max_processing_time(serve: Any, client: Any) -> None:
    max_processing_time, others = 1.5, 50
    svc = Service("slowpoke")
    starts: list[float] = []
    cancelled: list[float] = []
    handled: list[str] = []

    @svc.subscribe(
        EVENT,
        max_processing_time=max_processing_time,
        ack_wait=1.0,  # shorter than the hang: in-progress acks must keep it ours
        max_deliver=2,
        backoff=[0.1],
        max_concurrency=4,
    )
    async def on_order_created(event: OrderCreated, ctx: Context) -> None:
        if event.order_id != "hang":
            handled.append(event.order_id)
            return
        starts.append(time.monotonic())
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.append(time.monotonic())

    await serve(svc)
    t0 = time.monotonic()
    await client.publish(EVENT, OrderCreated("hang", 1), event_id="hang")
    await wait_until(lambda: len(starts) == 1, 5, "the hanging handler to start")
    for i in range(others):
        await client.publish(EVENT, OrderCreated(f"o-{i}", i))
    await wait_until(lambda: len(handled) == others, 5, "the other events")
    others_done_s = time.monotonic() - t0
    await wait_until(lambda: len(cancelled) == 2, 10, "both attempts cancelled")

    letters = []
    with anyio.fail_after(5):
        while not letters:
            letters = await list_dead_letters(client, service="slowpoke")
            await anyio.sleep(0.05)
    first_run = cancelled[0] - starts[0]
    record_figures(
        "hanging_handler",
        published=others + 1,
        handled=len(handled),
        lost=0,
        max_processing_time_s=max_processing_time,
        others_handled_within_s=round(others_done_s, 2),
        hung_attempt_cancelled_after_s=round(first_run, 2),
        attempts=len(starts),
        dead_lettered=len(letters),
    )
    assert others_done_s < max_processing_time  # not queued behind the hung one
    assert max_processing_time - 0.1 <= first_run < max_processing_time + 1.0
    # ack_wait was shorter than the hang, yet no parallel redelivery: one run per attempt.
    assert len(starts) == 2
    (letter,) = letters
    assert (letter.reason, letter.attempts, letter.event_id) == ("max_deliver", 2, "hang")
    assert "processing time exceeded" in letter.error
    stats = (await stats_of(client, "slowpoke")).endpoints[0]
    assert stats.last_error == "processing time exceeded"
    assert stats.num_errors == 2


# -- the nats-cluster/ config dir ------------------------------------------------------------


CLUSTER_DIR = ROOT / "nats-cluster"


def test_cluster_configs_are_valid() -> None:
    from framework.dev.devserver import find_nats_server

    confs = sorted(CLUSTER_DIR.glob("n*.conf"))
    assert [c.name for c in confs] == ["n1.conf", "n2.conf", "n3.conf"]
    stores = set()
    for conf in confs:
        result = subprocess.run(
            [find_nats_server(), "-t", "-c", str(conf)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        text = conf.read_text()
        assert "127.0.0.1" in text and "0.0.0.0" not in text  # loopback only
        stores.add(next(line for line in text.splitlines() if "store_dir" in line))
    assert len(stores) == 3  # distinct store dirs


def test_configs_state_their_durability() -> None:
    """nats.conf says how often it fsyncs (the default, stated); the cluster fsyncs always."""
    import re

    local = re.search(r"^\s*sync_interval:\s*(\S+)", (ROOT / "nats.conf").read_text(), re.M)
    assert local is not None and local.group(1).strip('"') == "2m"
    for conf in sorted(CLUSTER_DIR.glob("n*.conf")):
        found = re.search(r"^\s*sync_interval:\s*(\S+)", conf.read_text(), re.M)
        assert found is not None and found.group(1) == "always", conf.name


@pytest.mark.slow
async def test_cluster_configs_form_a_jetstream_cluster(tmp_path: Path) -> None:
    """The committed configs, on free ports and a temp store, elect a leader and hold R3."""
    import nats

    confs = sorted(CLUSTER_DIR.glob("n*.conf"))
    ports = {str(p): str(free_port()) for p in (4222, 4223, 4224, 6222, 6223, 6224)}
    servers = []
    for conf in confs:
        text = conf.read_text()
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
        text = text.replace(".mesh/cluster", str(tmp_path / "cluster"))
        path = tmp_path / conf.name
        path.write_text(text)
        client_port = int(ports[str(4221 + int(conf.stem[1:]))])
        servers.append(
            NatsServer(
                client_port,
                config_file=path,
                jetstream=False,
                log_file=tmp_path / f"{conf.stem}.log",
            )
        )
    try:
        for server in servers:
            await anyio.to_thread.run_sync(server.start)
        await wait_jetstream_ready([s.url for s in servers], 30)
        nc = await nats.connect(servers=[s.url for s in servers])
        try:
            js = nc.jetstream()
            info = await js.add_stream(name="PROBE", subjects=["probe.>"], num_replicas=3)
            assert info.config.num_replicas == 3
            await js.publish("probe.x", b"1")
            with anyio.fail_after(10):
                while True:
                    info = await js.stream_info("PROBE")
                    replicas = info.cluster.replicas or []
                    if len(replicas) == 2 and all(r.current for r in replicas):
                        break
                    await anyio.sleep(0.1)
            names = {info.cluster.leader, *(r.name for r in replicas)}
            assert names == {"n1", "n2", "n3"}
            for n in ("n1", "n2", "n3"):
                assert (tmp_path / "cluster" / n / "jetstream").is_dir()
        finally:
            await nc.close()
    finally:
        for server in servers:
            server.cleanup()


# -- a stream that cannot be created ------------------------------------------------------


async def test_a_stream_that_cannot_be_created_reports_why(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_REPLICAS", "3")  # a cluster setting against a single server
    with pytest.raises(Exception, match=r"(?i)replicas|clustered") as caught:
        async with Service("orders", publishes=[EVENT]).serve(nats_server.url):
            pass
    assert "stream not found" not in str(caught.value)
