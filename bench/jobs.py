"""Background jobs: the framework against taskiq + taskiq-nats, on one server, in one run.

    python -m bench.jobs [--quick] [--uvloop] [--rounds N] [--output FILE|-]

taskiq with taskiq-nats' `PullBasedJetStreamBroker` is the existing NATS job queue for
Python: durable (JetStream), one stream, one pull consumer. Every worker runs at its
defaults: the framework's `@service.job("noop")` (`max_concurrency` 16), taskiq's
receiver (100 tasks at most) with taskiq-nats' default `pull_consume_batch=1` (a fetch
per job: what a user gets out of the box); taskiq also runs tuned, `pull_consume_batch=64`
(nats-py's fetch then waits for 64 jobs or its 5 s timeout, so an idle queue starts a job
up to 5 s late: not used for latency). Each worker runs in a process of its own
(`python -m bench.jobs worker-<variant> URL`), the producer in this one; rounds alternate
the variants.

- throughput, no-op jobs: `PRODUCERS` tasks enqueue N jobs (a small struct payload)
  as fast as they can, the worker runs a handler that does nothing; the rate is N over
  the time from the first enqueue until the queue is drained (every job acknowledged;
  checked every 20 ms). The framework does more per job: a job's status record is
  written when it ends (and when it starts, for jobs longer than 0.1 s), compare-and-set,
  which is what gives it status, progress, unique ids and effectively-once runs (a
  queued job's message is its record until then); taskiq keeps no result or status.
  CPU per job is the worker process's and this (producer) process's, over the rounds.
- enqueue rate, `PRODUCERS` in flight: the producer side of the same rounds (N over
  the time the enqueues took, the worker draining meanwhile).
- enqueue rate, one at a time: `SEQUENTIAL_JOBS` enqueues, each awaited before the next.
- enqueue-to-start latency: one job at a time on an idle queue; the handler publishes
  its start time (core NATS) and the producer takes the difference from just before
  its enqueue call (same machine, same clock).

Ratios are framework / taskiq. The target (issue 13) is >= 2x taskiq-nats throughput
for no-op jobs (its default); the tuned column shows how the framework compares with a
taskiq-nats tuned for throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import nats

from bench.common import (
    CommonArgs,
    Peer,
    RunStats,
    add_common_args,
    alternate,
    common_args,
    environment,
    format_table,
    loop_name,
    ratio,
    run_loop,
    run_standalone,
    wait_for_stdin_eof,
)
from framework import Client, JobContext, Service, configure_logging, connect

KEY = "jobs"
KIND = "bench.noop"
TASKIQ_BATCH = {"taskiq": 1, "taskiq-64": 64}  # variant -> pull_consume_batch
VARIANTS = ("framework", *TASKIQ_BATCH)
STARTED = "bench.jobs.started"
PRODUCERS = 64
FULL_JOBS, QUICK_JOBS = 5000, 1000
SEQUENTIAL_JOBS = 1000
LATENCY_JOBS = 200
DRAIN_TIMEOUT = 300.0
TARGET = 2.0  # issue 13: at least 2x taskiq-nats' throughput, no-op jobs


class Item(msgspec.Struct):
    n: int
    name: str


# --- the two workers ----------------------------------------------------------------


def framework_service(report: bool) -> Service:
    service = Service("bench")

    @service.job("noop")  # the defaults
    async def noop(item: Item, job: JobContext) -> None:
        if report and item.name == "report":
            await job.client.nc.publish(STARTED, f"{item.n} {time.time()}".encode())

    return service


def taskiq_names(variant: str) -> tuple[str, str, str]:
    """Stream, subject and durable of one taskiq variant (each has its own)."""
    batch = TASKIQ_BATCH[variant]
    return f"TASKIQ_BENCH_{batch}", f"taskiq.bench.{batch}", f"taskiq_bench_{batch}"


def taskiq_broker(url: str, variant: str) -> tuple[Any, Any]:
    from taskiq_nats import PullBasedJetStreamBroker

    stream, subject, durable = taskiq_names(variant)
    broker = PullBasedJetStreamBroker(
        url,
        subject=subject,
        stream_name=stream,
        durable=durable,
        pull_consume_batch=TASKIQ_BATCH[variant],
    )
    reporter: dict[str, Any] = {}

    @broker.task(task_name="noop")
    async def noop(n: int, name: str, report: bool = False) -> None:
        if report:
            await reporter["nc"].publish(STARTED, f"{n} {time.time()}".encode())

    return broker, (noop, reporter)


async def run_framework_worker(url: str) -> None:
    async with connect(url) as client, framework_service(report=True).serve(client):
        await wait_for_stdin_eof()


async def run_taskiq_worker(url: str, variant: str) -> None:
    from taskiq.api import run_receiver_task

    broker, (_, reporter) = taskiq_broker(url, variant)
    reporter["nc"] = await nats.connect(url)
    receiver = asyncio.create_task(
        run_receiver_task(broker, run_startup=True)  # its defaults (100 tasks at most)
    )
    await wait_for_stdin_eof()
    receiver.cancel()
    await reporter["nc"].close()


# --- the producer side ---------------------------------------------------------------


class Producer:
    """Enqueues through one variant; knows when its queue is drained."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self._client: Any = None
        self._broker: Any = None
        self._task: Any = None

    async def open(self) -> None:
        self._client = await Client.open(self.url, name=f"bench-{self.name}")
        if self.name in TASKIQ_BATCH:
            self._broker, (self._task, _) = taskiq_broker(self.url, self.name)
            await self._broker.startup()

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
        await self._client.close()

    async def enqueue(self, n: int, report: bool = False) -> None:
        if self.name in TASKIQ_BATCH:
            await self._task.kiq(n, "widget", report=report)
        else:
            await self._client.enqueue(KIND, Item(n, "widget" if not report else "report"))

    async def drained(self) -> bool:
        js = self._client.js
        if self.name in TASKIQ_BATCH:
            stream, _, durable = taskiq_names(self.name)
            info = await js.consumer_info(stream, durable)
            return not info.num_pending and not info.num_ack_pending
        return (await js.stream_info("JOBS")).state.messages == 0


def throughput(
    producer: Producer, jobs: int, rates: dict[str, list[float]], peer: Peer | None = None
) -> Callable[[], Awaitable[RunStats]]:
    async def run() -> RunStats:
        queue = iter(range(jobs))
        worker_cpu = peer.cpu_seconds() if peer is not None else None
        own_cpu = time.process_time()
        started = time.perf_counter()

        async def produce() -> None:
            for n in queue:
                await producer.enqueue(n)

        await asyncio.gather(*(produce() for _ in range(PRODUCERS)))
        enqueued = time.perf_counter() - started
        rates[producer.name].append(round(jobs / enqueued, 1))
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while not await producer.drained():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{producer.name}: queue not drained")
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
        rates[f"{producer.name} producer cpu"].append(
            round((time.process_time() - own_cpu) / jobs * 1e6, 1)
        )
        after = peer.cpu_seconds() if peer is not None else None
        cpu = None if worker_cpu is None or after is None else (after - worker_cpu) / jobs * 1e6
        rate = round(jobs / seconds, 1)
        return RunStats(jobs, round(seconds, 4), rate, 0.0, 0.0, cpu and round(cpu, 1))

    return run


async def sequential(producer: Producer, jobs: int) -> RunStats:
    """Enqueues awaited one by one (the worker drains meanwhile)."""
    started = time.perf_counter()
    for n in range(jobs):
        await producer.enqueue(n)
    seconds = time.perf_counter() - started
    while not await producer.drained():
        await asyncio.sleep(0.02)
    return RunStats(jobs, round(seconds, 4), round(jobs / seconds, 1), 0.0, 0.0)


async def latency(producer: Producer, nc: Any, jobs: int) -> RunStats:
    """Enqueue-to-start, one job at a time (the handler reports its start)."""
    starts: dict[int, asyncio.Future[float]] = {}

    async def on_start(msg: Any) -> None:
        n, when = msg.data.decode().split()
        future = starts.get(int(n))
        if future is not None and not future.done():
            future.set_result(float(when))

    sub = await nc.subscribe(STARTED, cb=on_start)
    await nc.flush()  # subscribed at the server before the first job can start
    latencies: list[int] = []
    started = time.perf_counter()
    try:
        for n in range(jobs):
            starts[n] = asyncio.get_running_loop().create_future()
            sent = time.time()
            await producer.enqueue(n, report=True)
            began = await asyncio.wait_for(starts[n], 30)
            latencies.append(int((began - sent) * 1e9))
    finally:
        await sub.unsubscribe()
    return RunStats.of(latencies, time.perf_counter() - started)


# --- the run ------------------------------------------------------------------------


async def benchmark(url: str, args: CommonArgs, use_uvloop: bool = False) -> dict[str, Any]:
    jobs = QUICK_JOBS if args.quick else FULL_JOBS
    rounds = args.rounds or (2 if args.quick else 3)
    print(
        f"Jobs benchmark on {url}, loop {loop_name()}: framework vs taskiq "
        f"{_version('taskiq')} + taskiq-nats {_version('taskiq-nats')}; {jobs} no-op jobs "
        f"per round from {PRODUCERS} producers, every worker at its defaults",
        flush=True,
    )
    peers = {
        name: Peer("bench.jobs", f"worker-{name}", url, use_uvloop=use_uvloop) for name in VARIANTS
    }
    producers = {name: Producer(name, url) for name in peers}
    for producer in producers.values():
        await producer.open()
    try:
        for peer in peers.values():
            await peer.start()
        await asyncio.sleep(2.0)  # the workers connected and pulling
        return await _measure(url, producers, peers, jobs, rounds)
    finally:
        for peer in peers.values():
            await peer.stop()
        for producer in producers.values():
            await producer.close()


async def _measure(
    url: str, producers: dict[str, Producer], peers: dict[str, Peer], jobs: int, rounds: int
) -> dict[str, Any]:
    measured: dict[str, list[float]] = defaultdict(list)
    for producer in producers.values():  # warm-up: streams, consumers, caches
        await throughput(producer, 200, defaultdict(list))()

    def report(name: str, index: int, stats: RunStats) -> None:
        cpu = f", worker {stats.peer_cpu_us:.0f} us CPU/job" if stats.peer_cpu_us else ""
        print(f"  round {index} {name:<9} {stats.rate:>9,.1f} jobs/s{cpu}", flush=True)

    print("\nthroughput (enqueue until drained):", flush=True)
    runs = {name: throughput(p, jobs, measured, peers[name]) for name, p in producers.items()}
    summary = await alternate(runs, rounds, on_run=report)
    print(f"\nenqueue, {SEQUENTIAL_JOBS} one at a time:", flush=True)
    one_by_one = {
        name: (await sequential(p, SEQUENTIAL_JOBS)).rate for name, p in producers.items()
    }
    nc = await nats.connect(url)
    try:
        print(f"\nenqueue-to-start latency, {LATENCY_JOBS} jobs one at a time:", flush=True)
        lat = {
            name: await latency(producers[name], nc, LATENCY_JOBS)
            for name in ("framework", "taskiq")
        }
    finally:
        await nc.close()
    return _results(summary, measured, one_by_one, lat)


Row = tuple[str, float, float, float, float, float]


def _rows(
    summary: dict[str, Any],
    measured: dict[str, list[float]],
    one_by_one: dict[str, float],
    lat: dict[str, RunStats],
) -> list[Row]:
    def median(key: str) -> float:
        return statistics.median(measured[key]) if measured[key] else float("nan")

    table = {
        "throughput, no-op (jobs/s)": {name: summary[name].rate for name in VARIANTS},
        f"enqueue, {PRODUCERS} in flight (jobs/s)": {name: median(name) for name in VARIANTS},
        "enqueue, one at a time (jobs/s)": one_by_one,
        "worker CPU per job (us)": {
            name: summary[name].peer_cpu_us or float("nan") for name in VARIANTS
        },
        "producer CPU per job (us)": {name: median(f"{name} producer cpu") for name in VARIANTS},
    }
    rows: list[Row] = []
    for title, values in table.items():
        fw, tq, tq64 = (values[name] for name in VARIANTS)
        rows.append((title, tq, tq64, fw, ratio(fw, tq), ratio(fw, tq64)))
    for title, field in (("enqueue-to-start p50 (ms)", "p50_ms"), ("... p99 (ms)", "p99_ms")):
        fw, tq = getattr(lat["framework"], field), getattr(lat["taskiq"], field)
        rows.append((title, tq, float("nan"), fw, ratio(fw, tq), float("nan")))
    return rows


def _results(
    summary: dict[str, Any],
    measured: dict[str, list[float]],
    one_by_one: dict[str, float],
    lat: dict[str, RunStats],
) -> dict[str, Any]:
    rows = _rows(summary, measured, one_by_one, lat)
    headers = ("scenario", "taskiq", "taskiq-64", "framework", "fw/taskiq", "fw/taskiq-64")
    print()
    print(format_table(headers, rows))
    vs_default, vs_tuned = rows[0][4], rows[0][5]
    verdict = "met" if vs_default >= TARGET else "NOT met"
    print(
        f"\nthroughput {vs_default:.2f}x taskiq-nats at its defaults (target >= {TARGET:g}x: "
        f"{verdict}), {vs_tuned:.2f}x taskiq-nats tuned (batch 64)"
    )
    return {
        "environment": environment(loop=loop_name()),
        "taskiq": _version("taskiq"),
        "taskiq_nats": _version("taskiq-nats"),
        "throughput": {name: summary[name].to_json() for name in VARIANTS},
        "enqueue_rate": {name: statistics.median(measured[name]) for name in VARIANTS},
        "enqueue_one_by_one": one_by_one,
        "latency": {name: asdict(stats) for name, stats in lat.items()},
        "table": [list(row) for row in rows],
        "target_met": vs_default >= TARGET,
    }


def summary_rows(data: dict[str, Any]) -> list[tuple[str, object, object, object, str, Any]]:
    """Rows of `python -m bench`'s combined table (raw: taskiq-nats at its defaults)."""
    by_title = {row[0]: row for row in data["table"]}
    throughput, enqueue = by_title["throughput, no-op (jobs/s)"], data["enqueue_rate"]
    p50 = by_title["enqueue-to-start p50 (ms)"]
    tq64, fw = throughput[2], throughput[3]
    return [
        ("jobs throughput, no-op (vs taskiq-nats)", throughput[1], fw, throughput[4], "jobs/s",
         _Target(f"ratio >= {TARGET:g}", throughput[4], TARGET)),
        ("jobs throughput, no-op (vs taskiq-nats batch 64)", tq64, fw, ratio(fw, tq64), "jobs/s",
         None),
        (f"jobs enqueue, {PRODUCERS} in flight", enqueue["taskiq"], enqueue["framework"],
         ratio(enqueue["framework"], enqueue["taskiq"]), "jobs/s", None),
        ("jobs enqueue-to-start p50", p50[1], p50[3], p50[4], "ms", None),
    ]  # fmt: skip


@dataclass(frozen=True)
class _Target:
    """What `python -m bench` shows in its target columns (a ratio at least `limit`)."""

    text: str
    value: float
    limit: float

    @property
    def met(self) -> bool:
        return self.value >= self.limit


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging(level="WARNING")
    if argv and argv[0].startswith("worker-"):
        variant, use_uvloop = argv[0].removeprefix("worker-"), "--uvloop" in argv
        worker = (
            run_framework_worker(argv[1])
            if variant == "framework"
            else run_taskiq_worker(argv[1], variant)
        )
        run_loop(worker, use_uvloop=use_uvloop)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.jobs", description=__doc__.split("\n")[0]
    )
    add_common_args(parser)
    return run_standalone(KEY, benchmark, common_args(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
