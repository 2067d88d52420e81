"""`mesh run --workers N`: RPC and consume throughput with 1 and with 2 worker processes.

    python -m bench.workers [--quick] [--rounds N] [--output FILE|-] [--workers 1 2 ...]

One nats-server; the services below (`bench.workers:service`) run under the real
`mesh run ... --workers N` command, as a user starts them, and this process is the load
generator. Worker counts alternate round by round (1, 2, 1, 2, ...); medians are shown.
Each round:

- consume: with the workers stopped, 30,000 events are published (batched) into the
  stream, the workers are started, and the drain rate is measured on the durable
  consumer from its first acknowledged event (polling its ack floor) to the last (the
  server's time of it), so process start-up does not count. The subscriber is the default one a user writes,
  `@service.subscribe("bench.job.v1")` (idempotent, default concurrency), handler no-op;
  then the same with `idempotent=False` (another event type, its own start of the
  workers), which separates the processes' CPU from the idempotency bookkeeping.
- rpc: `client.call("benchworkers.echo", payload, timeout=10)` with 64 calls in flight
  per load process (`--clients N`, default 1: this process), 30,000 calls in all.

Everything shares the machine: on 2 cores the server, the workers and the load
generator compete, so 2 workers cannot double anything; the figures show what a second
process buys here (see the README's `mesh run --workers` notes for more cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

# the subscriber a user writes (idempotent by default), and the same without idempotency
HANDLERS = {"consume": ("bench.job.v1", "on_job"), "consume_plain": ("bench.task.v1", "on_task")}
KEYS = ("rpc", "consume", "consume_plain")
CONCURRENCY = 64


class Job(msgspec.Struct):
    n: int


class Echo(msgspec.Struct):
    text: str


service = Service("benchworkers", version="1.0.0", description="mesh run --workers benchmark")


@service.rpc()
async def echo(req: Echo, ctx: Context) -> Echo:
    return req


@service.subscribe("bench.job.v1")
async def on_job(event: Job, ctx: Context) -> None:
    return None


@service.subscribe("bench.task.v1", idempotent=False)
async def on_task(event: Job, ctx: Context) -> None:
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


async def _consumer(client: Any, handler: str) -> tuple[str, str]:
    """A subscriber's stream and durable consumer, as it advertises them."""
    (info, *_) = await client.info("benchworkers", timeout=0.5)
    (meta,) = [e.metadata for e in info.endpoints if e.name == handler]
    return meta["stream"], meta["consumer"]


async def _backlog(client: Any, event_type: str, count: int) -> None:
    async with client.batch(max_outstanding=1024) as batch:
        for n in range(count):
            await batch.publish(event_type, Job(n))


async def _ack_floor(client: Any, stream: str, durable: str) -> int:
    """The consumer's ack floor in its own sequence (the stream also holds other types)."""
    floor: int = (await client.js.consumer_info(stream, durable)).ack_floor.consumer_seq
    return floor


async def _drain_rate(client: Any, stream: str, durable: str, start: int, count: int) -> float:
    """Events per second from the first acknowledgement past `start` to the last one.

    The start is the last poll that still saw no acknowledgement (so the interval can
    only be too long, never too short); the end is the server's time of the last ack.
    """
    target, before = start + count, time.time()
    while True:
        info = await client.js.consumer_info(stream, durable)
        if info.ack_floor.consumer_seq <= start:
            before = time.time()
        elif info.ack_floor.consumer_seq >= target and info.num_ack_pending == 0:
            seconds: float = info.ack_floor.last_active.timestamp() - before
            return count / max(seconds, 1e-3)
        await asyncio.sleep(0.01)


async def _calls(url: str, calls: int) -> tuple[int, float]:
    """`calls` echo calls, 64 in flight, after a warm-up: (count, seconds)."""
    payload = Echo("x" * 64)
    async with connect(url, name="bench-load") as client:

        async def call() -> object:
            return await client.call("benchworkers.echo", payload, returns=Echo, timeout=10)

        await drive(call, min(2000, calls), CONCURRENCY)  # warm-up
        stats = await drive(call, calls, CONCURRENCY)
    return stats.count, stats.seconds


async def _rpc_rate(url: str, calls: int, clients: int) -> float:
    """Calls per second from `clients` load processes (this one when 1), summed."""
    if clients == 1:
        count, seconds = await _calls(url, calls)
        return count / seconds
    loads = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.workers", "load", url, str(calls // clients)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        for _ in range(clients)
    ]
    outputs = [await load.communicate() for load in loads]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]  # the last line
    return float(sum(result["count"] / result["seconds"] for result in results))


async def _consume_rate(
    url: str, workers: int, event_type: str, consumer: tuple[str, str], events: int
) -> tuple[float, Workers]:
    """Backlog with the workers stopped, then start them and time the drain."""
    stream, durable = consumer
    async with connect(url, name="bench-load") as client:
        start = await _ack_floor(client, stream, durable)
        await _backlog(client, event_type, events)
        running = Workers(url, workers)
        try:
            rate = await _drain_rate(client, stream, durable, start, events)
            await running.ready(client)
        except BaseException:
            running.stop()
            raise
    return rate, running


async def one_round(
    url: str,
    consumers: dict[str, tuple[str, str]],
    workers: int,
    sizes: tuple[int, int],
    clients: int,
) -> dict[str, float]:
    events, calls = sizes
    result: dict[str, float] = {}
    for key, (event_type, _) in HANDLERS.items():
        rate, running = await _consume_rate(url, workers, event_type, consumers[key], events)
        result[key] = round(rate, 1)
        try:
            if key == "consume":  # the same workers, now serving calls
                result["rpc"] = round(await _rpc_rate(url, calls, clients), 1)
        finally:
            running.stop()
    return result


async def _prepare(url: str) -> dict[str, tuple[str, str]]:
    """Start the services once: the streams and the durable consumers then exist."""
    async with connect(url, name="bench-load") as client:
        first = Workers(url, 1)
        try:
            await first.ready(client)
            return {key: await _consumer(client, h) for key, (_, h) in HANDLERS.items()}
        finally:
            first.stop()


# --- the run ------------------------------------------------------------------------


async def benchmark(
    url: str, counts: list[int], rounds: int, quick: bool, clients: int
) -> dict[str, Any]:
    events, calls = (5_000, 5_000) if quick else (30_000, 30_000)
    consumers = await _prepare(url)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for index in range(rounds):
        for workers in counts:
            result = await one_round(url, consumers, workers, (events, calls), clients)
            runs[workers].append(result)
            print(
                f"round {index + 1}: {workers} worker(s): rpc {result['rpc']:,.0f} req/s, "
                f"consume {result['consume']:,.0f} events/s, "
                f"not idempotent {result['consume_plain']:,.0f} events/s",
                flush=True,
            )
    medians = {
        n: {key: statistics.median(r[key] for r in results) for key in KEYS}
        for n, results in runs.items()
    }
    return {
        "events": events,
        "calls": calls,
        "concurrency": CONCURRENCY,
        "load_processes": clients,
        "cpus": os.cpu_count(),
        "rounds": {str(n): r for n, r in runs.items()},
        "medians": {str(n): m for n, m in medians.items()},
    }


def table(data: dict[str, Any]) -> str:
    medians = data["medians"]
    base = medians[min(medians, key=int)]
    rows = [
        [f"{n} worker(s)", *(v for key in KEYS for v in (m[key], round(m[key] / base[key], 2)))]
        for n, m in sorted(medians.items(), key=lambda item: int(item[0]))
    ]
    headers = ["mesh run --workers", "rpc req/s", "x", "consume ev/s", "x"]
    return format_table([*headers, "consume, idempotent=False", "x"], rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:  # a load process started by _rpc_rate: load URL CALLS
        configure_logging(level="WARNING", stream=sys.stderr)
        count, seconds = asyncio.run(_calls(argv[1], int(argv[2])))
        print(json.dumps({"count": count, "seconds": seconds}))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    add_common_args(parser)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="N")
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        metavar="N",
        help="load-generating processes for the RPC rows (default: 1, this one); one "
        "Python process drives about 10k calls/s, so use more where there are cores",
    )
    ns = parser.parse_args(argv)
    args = common_args(ns)
    configure_logging(level="WARNING")
    rounds = args.rounds or (2 if args.quick else 3)
    with nats_server() as server:
        data = asyncio.run(benchmark(server.url, ns.workers, rounds, args.quick, ns.clients))
    print(
        f"\nmedians of {rounds} rounds, {ns.clients} load process(es), "
        f"{data['cpus']} CPUs shared by everything:\n"
    )
    print(table(data))
    if args.output is not None:
        merge_results("workers", data, args.output)
        print(f"\nresults stored under 'workers' in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
