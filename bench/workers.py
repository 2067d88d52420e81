"""`mesh run --workers N`: RPC and consume throughput with 1 and with 2 worker processes.

    python -m bench.workers [--quick] [--rounds N] [--output FILE|-] [--workers 1 2 ...]

One nats-server; the services below (`bench.workers:service`) run under the real
`mesh run ... --workers N` command, as a user starts them, and this process is the load
generator. Worker counts alternate round by round (1, 2, 1, 2, ...); medians are shown.
Each round:

- consume: with the workers stopped, `EVENTS` events are published (batched) into the
  stream, the workers are started, and the drain rate is measured on the durable
  consumer from its first acknowledged event to the last (polling its ack floor), so
  process start-up does not count. The subscriber is the default one a user writes,
  `@service.subscribe("bench.job.v1")` (idempotent, default concurrency), handler no-op.
- rpc: `client.call("benchworkers.echo", payload, timeout=10)` with 64 calls in flight,
  `CALLS` calls, from this one process.

Everything shares the machine: on 2 cores the server, the workers and the load
generator compete, so 2 workers cannot double anything; the figures show what a second
process buys here (see the README's `mesh run --workers` notes for more cores).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import msgspec

from bench.common import (
    ROOT,
    add_common_args,
    common_args,
    drive,
    format_table,
    merge_results,
    nats_server,
)
from framework import Context, Service, configure_logging, connect

EVENT_TYPE = "bench.job.v1"
CONCURRENCY = 64


class Job(msgspec.Struct):
    n: int


class Echo(msgspec.Struct):
    text: str


service = Service("benchworkers", version="1.0.0", description="mesh run --workers benchmark")


@service.rpc()
async def echo(req: Echo, ctx: Context) -> Echo:
    return req


@service.subscribe(EVENT_TYPE)
async def on_job(event: Job, ctx: Context) -> None:
    return None


# --- the measured side --------------------------------------------------------------


class Workers:
    """`mesh run bench.workers:service --workers N` in a process group of its own."""

    def __init__(self, url: str, workers: int) -> None:
        self.workers = workers
        env = {**os.environ, "NATS_URL": url, "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "framework.cli", "run", "bench.workers:service"]
        self.proc = subprocess.Popen(
            [*argv, "--workers", str(workers), "--app-dir", str(ROOT)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self, client: Any) -> None:
        deadline = time.monotonic() + 30
        while len(await client.ping("benchworkers", timeout=0.2)) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.workers} workers did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _consumer(client: Any) -> tuple[str, str]:
    """The subscriber's stream and durable consumer, as it advertises them."""
    (info, *_) = await client.info("benchworkers", timeout=0.5)
    (meta,) = [e.metadata for e in info.endpoints if e.name == "on_job"]
    return meta["stream"], meta["consumer"]


async def _backlog(client: Any, count: int) -> None:
    async with client.batch(max_outstanding=1024) as batch:
        for n in range(count):
            await batch.publish(EVENT_TYPE, Job(n))


async def _ack_floor(client: Any, stream: str, durable: str) -> int:
    floor: int = (await client.js.consumer_info(stream, durable)).ack_floor.stream_seq
    return floor


async def _drain_rate(client: Any, stream: str, durable: str, start: int, count: int) -> float:
    """Events per second from the first acknowledgement past `start` to the last one."""
    first: tuple[float, int] | None = None
    target = start + count
    while True:
        info = await client.js.consumer_info(stream, durable)
        floor, now = info.ack_floor.stream_seq, time.perf_counter()
        if first is None and floor > start:
            first = (now, floor)
        if floor >= target and info.num_ack_pending == 0:
            assert first is not None
            seconds = now - first[0]
            return (floor - first[1]) / seconds if seconds > 0 else float("inf")
        await asyncio.sleep(0.01)


async def one_round(
    url: str, consumer: tuple[str, str], workers: int, events: int, calls: int
) -> dict[str, float]:
    stream, durable = consumer
    async with connect(url, name="bench-load") as client:
        start = await _ack_floor(client, stream, durable)
        await _backlog(client, events)
        running = Workers(url, workers)
        try:
            consume = await _drain_rate(client, stream, durable, start, events)
            await running.ready(client)
            payload = Echo("x" * 64)

            async def call() -> object:
                return await client.call("benchworkers.echo", payload, returns=Echo, timeout=10)

            await drive(call, min(2000, calls), CONCURRENCY)  # warm-up
            rpc = await drive(call, calls, CONCURRENCY)
        finally:
            running.stop()
    return {"rpc": rpc.rate, "consume": round(consume, 1)}


async def _prepare(url: str) -> tuple[str, str]:
    """Start the services once: the stream and the durable consumer then exist."""
    async with connect(url, name="bench-load") as client:
        first = Workers(url, 1)
        try:
            await first.ready(client)
            return await _consumer(client)
        finally:
            first.stop()


# --- the run ------------------------------------------------------------------------


async def benchmark(url: str, counts: list[int], rounds: int, quick: bool) -> dict[str, Any]:
    events, calls = (5_000, 5_000) if quick else (30_000, 30_000)
    consumer = await _prepare(url)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for index in range(rounds):
        for workers in counts:
            result = await one_round(url, consumer, workers, events, calls)
            runs[workers].append(result)
            print(
                f"round {index + 1}: {workers} worker(s): rpc {result['rpc']:,.0f} req/s, "
                f"consume {result['consume']:,.0f} events/s",
                flush=True,
            )
    medians = {
        n: {key: statistics.median(r[key] for r in results) for key in ("rpc", "consume")}
        for n, results in runs.items()
    }
    return {
        "events": events,
        "calls": calls,
        "concurrency": CONCURRENCY,
        "cpus": os.cpu_count(),
        "rounds": {str(n): r for n, r in runs.items()},
        "medians": {str(n): m for n, m in medians.items()},
    }


def table(data: dict[str, Any]) -> str:
    medians = data["medians"]
    base = medians[min(medians, key=int)]
    rows = [
        [
            f"{n} worker(s)",
            m["rpc"],
            round(m["rpc"] / base["rpc"], 2),
            m["consume"],
            round(m["consume"] / base["consume"], 2),
        ]
        for n, m in sorted(medians.items(), key=lambda item: int(item[0]))
    ]
    headers = ["mesh run --workers", "rpc req/s", "x", "consume events/s", "x"]
    return format_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N")
    ns = parser.parse_args(argv)
    args = common_args(ns)
    configure_logging(level="WARNING")
    rounds = args.rounds or (2 if args.quick else 3)
    with nats_server() as server:
        data = asyncio.run(benchmark(server.url, ns.workers, rounds, args.quick))
    print(f"\nmedians of {rounds} rounds, {data['cpus']} CPUs shared by everything:\n")
    print(table(data))
    if args.output is not None:
        merge_results("workers", data, args.output)
        print(f"\nresults stored under 'workers' in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
