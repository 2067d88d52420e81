"""What `sync_interval: always` costs a publisher: acknowledged publishes per second and
latency, with the server's default fsync (every 2 minutes) and with an fsync per write.

    python -m bench.durability [--events N] [--cluster] [--store DIR]

Jepsen's NATS 2.12.1 analysis showed that the default can lose acknowledged writes on
power loss (an acknowledged write sits in the page cache for up to 2 minutes). With
`always` the server fsyncs before it acknowledges; on a cluster (R3) the Raft log is
synced instead and the stream store relaxes to a sync per snapshot. The setting is the
server's, for every stream; on a single server a stream that does not need it opts out
with `persist_mode: async` (`Stream(..., extra={"persist_mode": "async"})`), which
nats-server refuses for replicated streams. Each variant runs on a fresh server (or 3-node cluster) whose store is under
`--store` (default: a temp dir; the disk it is on is what is measured).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from framework import BatchPublisher, Stream, configure_logging, connect
from framework.dev.devserver import NatsCluster, NatsServer


async def _measure(urls: list[str], events: int, replicas: int, persist: str) -> dict[str, float]:
    async with connect(urls) as client:
        extra = {"persist_mode": persist} if persist != "default" else {}
        stream = Stream("DURABLE", ["events.durable.>"], replicas=replicas, extra=extra)
        await client.js.add_stream(stream.config())
        latencies: list[float] = []
        for i in range(min(events, 500)):  # one at a time: the latency of an acked publish
            started = time.perf_counter()
            await client.publish("durable.thing.happened.v1", {"n": i})
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        async with BatchPublisher(client, max_outstanding=256) as publisher:
            for i in range(events):  # many in flight: throughput
                await publisher.publish("durable.thing.happened.v1", {"n": i})
        batch_s = time.perf_counter() - started
    return {
        "single_p50_ms": statistics.median(latencies) * 1000,
        "single_p99_ms": statistics.quantiles(latencies, n=100)[98] * 1000,
        "batched_per_s": events / batch_s,
    }


def _run_single(store: Path, sync: str, persist: str, events: int) -> dict[str, float]:
    conf = store / f"{sync}.conf"
    conf.write_text(f"jetstream {{ sync_interval: {sync} }}\n" if sync != "default" else "")
    with NatsServer(store_dir=store / f"single-{sync}-{persist}", config_file=conf) as server:
        return asyncio.run(_measure([server.url], events, 1, persist))


def _run_cluster(store: Path, sync: str, persist: str, events: int) -> dict[str, float]:
    cluster = NatsCluster(3, base_dir=store / f"cluster-{sync}-{persist}")
    if sync != "default":
        conf = store / f"{sync}.conf"
        conf.write_text(f"jetstream {{ sync_interval: {sync} }}\n")
        for node in cluster.nodes:
            node._config_file = conf  # the same flags, plus the sync setting
    with cluster:
        return asyncio.run(_measure(cluster.urls, events, 3, persist))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--cluster", action="store_true", help="a 3-node cluster, R3 stream")
    parser.add_argument("--store", default=None, help="where the stores go (default: temp)")
    args = parser.parse_args()
    configure_logging(json=False, level="warning")
    run = _run_cluster if args.cluster else _run_single
    variants = [("default", "default"), ("always", "default")]
    if not args.cluster:  # "async persist mode is not supported on replicated streams"
        variants.append(("always", "async"))
    with tempfile.TemporaryDirectory(dir=args.store) as tmp:
        print(
            f"{'sync_interval':14} {'persist_mode':13} {'p50 ms':>8} {'p99 ms':>8} {'batched/s':>10}"
        )
        for sync, persist in variants:
            r = run(Path(tmp), sync, persist, args.events)
            print(
                f"{sync:14} {persist:13} {r['single_p50_ms']:8.2f} {r['single_p99_ms']:8.2f} "
                f"{r['batched_per_s']:10.0f}"
            )


if __name__ == "__main__":
    main()
