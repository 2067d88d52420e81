"""Domain events: the framework against raw nats-py JetStream, on one server, in one run.

    python -m bench.events [--quick] [--uvloop] [--rounds N] [--output FILE|-]

One nats-server for the whole run, one stream both sides use: `EVENTS_BENCH` on
`events.bench.>`, file storage (what the framework would create for the `bench`
domain). Event type `bench.item.created.v1` lands in `events.bench.item.created.v1`.
Each scenario runs its variants alternately (raw, framework, raw, framework, ...),
each round on a fresh connection; the tables show medians of the rounds.

- publish 1-by-1: one event at a time, awaiting each JetStream ack. Raw:
  `js.publish(subject, json.dumps(obj).encode(), headers={"Nats-Msg-Id": id})`;
  framework: `client.publish("bench.item.created.v1", Item(...))`, which also sets
  Event-Type, Event-Time, Correlation-Id and Producer.
- publish batched: at most `MAX_OUTSTANDING` unacknowledged, then wait for every ack.
  Raw: `nc.jetstream(publish_async_max_pending=MAX_OUTSTANDING)`, `js.publish_async`
  per event, `js.publish_async_completed()`; framework:
  `async with client.batch() as batch` (its default `max_outstanding`, 256).
- consume with ack: the stream is purged and pre-filled once with N events by the
  framework's `BatchPublisher` (all framework headers; outside any timing), then each
  round drains all N through a fresh durable consumer (a new name per round, deleted
  afterwards). The consumer runs in this (the main) process; the server is the only
  other process. Raw: `js.pull_subscribe(subject, durable)` and a `fetch(batch=
  FETCH_BATCH)` loop with `json.loads` and `await msg.ack()` per message. Framework, at
  its defaults as the README shows it: a fresh `Service` per round with
  `@svc.subscribe(type)` (idempotent, `max_concurrency=16`, `max_unsettled=128`) and
  a handler that does nothing; the same with `idempotent=False`; and, as extra tuned
  rows, both with `max_concurrency=64`. Idempotent rounds delete their processed-ids
  bucket afterwards. Rate is events per second from the first event handled to the last;
  after each round the consumer must show no pending and no unacknowledged messages.
  The consumer process's CPU time per event (`time.process_time`) is reported too: it
  varies less than throughput on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
from nats.js import api
from nats.js.errors import NotFoundError

from bench.common import (
    CommonArgs,
    RunStats,
    Summary,
    add_common_args,
    alternate,
    common_args,
    drive,
    environment,
    format_table,
    loop_name,
    ratio,
    run_standalone,
)
from framework import BatchPublisher, Service, configure_logging, connect

KEY = "events"
STREAM = "EVENTS_BENCH"
STREAM_SUBJECTS = ["events.bench.>"]
EVENT_TYPE = "bench.item.created.v1"
SUBJECT = f"events.{EVENT_TYPE}"
MAX_OUTSTANDING = 256
FETCH_BATCH = 128  # raw pull size
MAX_CONCURRENCY = 64  # the tuned rows
SERVICE = "bench"
DRAIN_TIMEOUT = 120.0


class Item(msgspec.Struct):
    id: int
    name: str
    amount: float
    tags: list[str]


def make_item(i: int) -> Item:
    return Item(id=i, name="widget", amount=12.5, tags=["red", "green", "blue"])


def make_dict(i: int) -> dict[str, Any]:
    return {"id": i, "name": "widget", "amount": 12.5, "tags": ["red", "green", "blue"]}


@dataclass(frozen=True)
class Sizes:
    publish: int  # events per round, one by one
    batched: int  # events per round, batched
    backlog: int  # events drained per consume round

    @property
    def publish_warmup(self) -> int:
        return max(50, self.publish // 10)


FULL = Sizes(publish=2000, batched=20000, backlog=20000)
QUICK = Sizes(publish=500, batched=5000, backlog=5000)


# --- stream -------------------------------------------------------------------------


async def ensure_stream(js: Any) -> None:
    """The stream both variants publish to and consume from (framework-like defaults)."""
    config = api.StreamConfig(
        name=STREAM,
        subjects=STREAM_SUBJECTS,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        max_age=7 * 24 * 3600.0,
        duplicate_window=120.0,
        num_replicas=1,
        allow_direct=True,
    )
    try:
        await js.stream_info(STREAM)
    except NotFoundError:
        await js.add_stream(config)


# --- publishing ---------------------------------------------------------------------


def publish_one_raw(url: str, sizes: Sizes) -> Callable[[], Awaitable[RunStats]]:
    async def run() -> RunStats:
        nc = await nats.connect(url, name="bench-raw-producer")
        try:
            js = nc.jetstream()
            prefix = os.urandom(6).hex()
            counter = 0

            async def op() -> None:
                nonlocal counter
                counter += 1
                await js.publish(
                    SUBJECT,
                    json.dumps(make_dict(counter)).encode(),
                    headers={"Nats-Msg-Id": f"{prefix}-{counter}"},
                )

            await drive(op, sizes.publish_warmup, 1)
            return await drive(op, sizes.publish, 1)
        finally:
            await nc.close()

    return run


def publish_one_framework(url: str, sizes: Sizes) -> Callable[[], Awaitable[RunStats]]:
    async def run() -> RunStats:
        async with connect(url, name="bench-producer") as client:
            counter = 0

            async def op() -> None:
                nonlocal counter
                counter += 1
                await client.publish(EVENT_TYPE, make_item(counter))

            await drive(op, sizes.publish_warmup, 1)
            return await drive(op, sizes.publish, 1)

    return run


def _batch_stats(count: int, seconds: float) -> RunStats:
    return RunStats(
        count=count,
        seconds=round(seconds, 4),
        rate=round(count / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=0.0,
        p99_ms=0.0,
    )


def publish_batched_raw(url: str, sizes: Sizes) -> Callable[[], Awaitable[RunStats]]:
    async def run() -> RunStats:
        nc = await nats.connect(url, name="bench-raw-batch-producer")
        try:
            js = nc.jetstream(publish_async_max_pending=MAX_OUTSTANDING)
            failures: list[BaseException] = []

            def settled(future: asyncio.Future[Any]) -> None:
                if future.cancelled():
                    failures.append(asyncio.CancelledError())
                elif future.exception() is not None:
                    failures.append(future.exception())  # type: ignore[arg-type]

            async def batch(total: int) -> float:
                prefix = os.urandom(6).hex()
                gc.collect()
                started = time.perf_counter()
                for i in range(total):
                    future = await js.publish_async(
                        SUBJECT,
                        json.dumps(make_dict(i)).encode(),
                        headers={"Nats-Msg-Id": f"{prefix}-{i}"},
                    )
                    future.add_done_callback(settled)
                await asyncio.wait_for(js.publish_async_completed(), 30)
                return time.perf_counter() - started

            await batch(sizes.batched // 10)  # warm-up
            seconds = await batch(sizes.batched)
            if failures:
                raise RuntimeError(f"raw batch: {len(failures)} not stored: {failures[0]!r}")
            return _batch_stats(sizes.batched, seconds)
        finally:
            await nc.close()

    return run


def publish_batched_framework(url: str, sizes: Sizes) -> Callable[[], Awaitable[RunStats]]:
    async def run() -> RunStats:
        async with connect(url, name="bench-batch-producer") as client:

            async def batch(total: int) -> float:
                gc.collect()
                started = time.perf_counter()
                async with client.batch() as publisher:  # max_outstanding=256 by default
                    for i in range(total):
                        await publisher.publish(EVENT_TYPE, make_item(i))
                seconds = time.perf_counter() - started
                if len(publisher.acks) != total:
                    raise RuntimeError(f"framework batch: {len(publisher.acks)}/{total} acked")
                return seconds

            await batch(sizes.batched // 10)  # warm-up
            return _batch_stats(sizes.batched, await batch(sizes.batched))

    return run


# --- consuming ----------------------------------------------------------------------


class Tracker:
    """First and last handled time; done when `total` were handled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.first = self.last = 0.0
        self.cpu_first = self.cpu_last = 0.0
        self.done = asyncio.Event()

    def hit(self) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
            self.cpu_first = time.process_time()
        self.count += 1
        self.last = now
        if self.count >= self.total:
            self.cpu_last = time.process_time()
            self.done.set()

    def stats(self) -> RunStats:
        """Rate and this process's CPU time per event, first to last event handled."""
        seconds = self.last - self.first
        handled = self.count - 1  # events handled after the first one
        cpu = self.cpu_last - self.cpu_first
        return RunStats(
            count=self.count,
            seconds=round(seconds, 4),
            rate=round(handled / seconds, 1) if seconds > 0 else 0.0,
            p50_ms=0.0,
            p99_ms=0.0,
            peer_cpu_us=round(cpu / handled * 1e6, 2) if handled > 0 else None,
        )


async def settle_consumer(js: Any, durable: str, timeout: float = 10.0) -> None:
    """Every event delivered and acknowledged (acks are fire-and-forget publishes)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await js.consumer_info(STREAM, durable)
        if not info.num_pending and not info.num_ack_pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"consumer {durable}: {info.num_pending} pending, "
                f"{info.num_ack_pending} unacknowledged after the drain"
            )
        await asyncio.sleep(0.05)


class Consume:
    """The consume-with-ack variants; one admin connection for set-up and clean-up."""

    def __init__(self, url: str, backlog: int) -> None:
        self.url = url
        self.backlog = backlog
        self.rounds = 0
        self.nc: Any = None
        self.js: Any = None

    async def open(self) -> None:
        self.nc = await nats.connect(self.url, name="bench-admin")
        self.js = self.nc.jetstream()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()

    async def fill(self) -> float:
        """Purge the stream and store `backlog` events with the framework's headers."""
        await self.js.purge_stream(STREAM)
        started = time.perf_counter()
        async with connect(self.url, name="bench-filler") as client:
            async with BatchPublisher(client, max_outstanding=MAX_OUTSTANDING) as publisher:
                for i in range(self.backlog):
                    await publisher.publish(EVENT_TYPE, make_item(i))
        info = await self.js.stream_info(STREAM)
        if info.state.messages != self.backlog:
            raise RuntimeError(f"stream holds {info.state.messages}, expected {self.backlog}")
        return time.perf_counter() - started

    def _name(self, kind: str) -> str:
        self.rounds += 1
        return f"drain_{kind}_{self.rounds}"

    def raw(self) -> Callable[[], Awaitable[RunStats]]:
        async def run() -> RunStats:
            durable = f"bench_{self._name('raw')}"
            nc = await nats.connect(self.url, name="bench-raw-consumer")
            tracker = Tracker(self.backlog)
            try:
                js = nc.jetstream()
                sub = await js.pull_subscribe(SUBJECT, durable=durable, stream=STREAM)
                gc.collect()
                while tracker.count < self.backlog:
                    try:
                        msgs = await sub.fetch(batch=FETCH_BATCH, timeout=5)
                    except nats.errors.TimeoutError:
                        raise RuntimeError(
                            f"raw consumer stalled at {tracker.count}/{self.backlog}"
                        ) from None
                    for msg in msgs:
                        json.loads(msg.data)
                        await msg.ack()
                        tracker.hit()
                await nc.flush()
                await settle_consumer(self.js, durable)
            finally:
                await nc.close()
            await self.js.delete_consumer(STREAM, durable)
            return tracker.stats()

        return run

    def framework(self, **options: Any) -> Callable[[], Awaitable[RunStats]]:
        """`@svc.subscribe(EVENT_TYPE, **options)` on a fresh service: no options is
        what the README shows, and what nearly every user runs."""

        async def run() -> RunStats:
            service = f"{SERVICE}{self._name('fw')}".replace("_", "")
            tracker = Tracker(self.backlog)
            svc = Service(service, description="events benchmark consumer")

            @svc.subscribe(EVENT_TYPE, **options)
            async def handle(event: Item) -> None:
                tracker.hit()

            gc.collect()
            async with svc.serve(self.url):
                try:
                    await asyncio.wait_for(tracker.done.wait(), DRAIN_TIMEOUT)
                except TimeoutError:
                    raise RuntimeError(
                        f"framework consumer stalled at {tracker.count}/{self.backlog}"
                    ) from None
                durable = f"{service}_handle"
                await settle_consumer(self.js, durable)
            await self.js.delete_consumer(STREAM, durable)
            if options.get("idempotent", True):
                await self.js.delete_key_value(f"processed_{service}_handle")
            return tracker.stats()

        return run

    def framework_default(self) -> Callable[[], Awaitable[RunStats]]:
        return self.framework()


# --- the benchmark ------------------------------------------------------------------

# variant name: (key, label, settings of the framework variant, round factory)
CONSUME_VARIANTS: dict[str, tuple[str, str, str, Callable[[Consume], Any]]] = {
    "raw": ("", "", "", lambda c: c.raw()),
    "default": (
        "consume_default",
        "consume with ack, defaults (idempotent)",
        "@svc.subscribe(type): idempotent, max_concurrency=16, max_unsettled=128",
        lambda c: c.framework(),
    ),
    "plain": (
        "consume_plain",
        "consume with ack, idempotent=False",
        "@svc.subscribe(type, idempotent=False): max_concurrency=16",
        lambda c: c.framework(idempotent=False),
    ),
    "tuned idem": (
        "consume_tuned_idempotent",
        f"consume, idempotent, max_concurrency={MAX_CONCURRENCY} (tuned)",
        f"@svc.subscribe(type, max_concurrency={MAX_CONCURRENCY})",
        lambda c: c.framework(max_concurrency=MAX_CONCURRENCY),
    ),
    "tuned plain": (
        "consume_tuned_plain",
        f"consume, idempotent=False, max_concurrency={MAX_CONCURRENCY} (tuned)",
        f"@svc.subscribe(type, idempotent=False, max_concurrency={MAX_CONCURRENCY})",
        lambda c: c.framework(idempotent=False, max_concurrency=MAX_CONCURRENCY),
    ),
}


@dataclass(frozen=True)
class Result:
    key: str  # stable id, what `bench.__main__` attaches targets to
    name: str  # what the tables show
    settings: str  # what the framework variant used, for the README table
    unit: str
    raw: Summary
    framework: Summary

    @property
    def rate_ratio(self) -> float:
        return ratio(self.framework.rate, self.raw.rate)

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "settings": self.settings,
            "unit": self.unit,
            "raw": self.raw.to_json(),
            "framework": self.framework.to_json(),
            "rate_ratio": self.rate_ratio,
            "cpu_ratio": (
                ratio(self.framework.peer_cpu_us, self.raw.peer_cpu_us)
                if self.framework.peer_cpu_us is not None and self.raw.peer_cpu_us is not None
                else None
            ),
        }


def _report(name: str, index: int, stats: RunStats) -> None:
    latency = f"  p50 {stats.p50_ms:.3f} ms  p99 {stats.p99_ms:.3f} ms" if stats.p50_ms else ""
    cpu = "" if stats.peer_cpu_us is None else f"  consumer CPU {stats.peer_cpu_us} us/event"
    print(
        f"  round {index} {name:16} {stats.rate:10,.0f} events/s "
        f"({stats.count} in {stats.seconds:.2f} s){latency}{cpu}",
        flush=True,
    )


async def benchmark(url: str, args: CommonArgs, use_uvloop: bool = False) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    publish_rounds = args.rounds or (3 if args.quick else 5)
    consume_rounds = args.rounds or (3 if args.quick else 5)
    loop = loop_name()
    print(
        f"Events benchmark: stream {STREAM} ({STREAM_SUBJECTS[0]}, file storage) on {url}, "
        f"loop {loop}; raw and framework alternate, medians of the rounds",
        flush=True,
    )
    started = time.perf_counter()
    admin = await nats.connect(url, name="bench-admin")
    try:
        await ensure_stream(admin.jetstream())
    finally:
        await admin.close()
    results: list[Result] = []

    print(f"\npublish 1-by-1: {sizes.publish} events per round, awaiting each ack", flush=True)
    summary = await alternate(
        {"raw": publish_one_raw(url, sizes), "framework": publish_one_framework(url, sizes)},
        publish_rounds,
        on_run=_report,
    )
    results.append(
        Result(
            "publish_one",
            "publish 1-by-1 (await each ack)",
            "client.publish(type, event)",
            "events/s",
            summary["raw"],
            summary["framework"],
        )
    )

    print(
        f"\npublish batched: {sizes.batched} events per round, "
        f"at most {MAX_OUTSTANDING} unacknowledged",
        flush=True,
    )
    summary = await alternate(
        {
            "raw": publish_batched_raw(url, sizes),
            "framework": publish_batched_framework(url, sizes),
        },
        publish_rounds,
        on_run=_report,
    )
    results.append(
        Result(
            "publish_batched",
            "publish batched",
            f"async with client.batch() (max_outstanding={MAX_OUTSTANDING})",
            "events/s",
            summary["raw"],
            summary["framework"],
        )
    )

    consume = Consume(url, sizes.backlog)
    await consume.open()
    try:
        fill_seconds = await consume.fill()
        print(
            f"\nconsume with ack: {sizes.backlog} events pre-filled in {fill_seconds:.1f} s "
            f"(untimed); each round drains them all through a fresh durable consumer in "
            f"this process (raw fetch batch {FETCH_BATCH}; framework at its defaults, "
            f"and tuned with max_concurrency={MAX_CONCURRENCY})",
            flush=True,
        )
        summary = await alternate(
            {name: make(consume) for name, (_, _, _, make) in CONSUME_VARIANTS.items()},
            consume_rounds,
            on_run=_report,
        )
        await consume.js.purge_stream(STREAM)
    finally:
        await consume.close()
    for name, (key, label, settings, _) in CONSUME_VARIANTS.items():
        if name != "raw":
            results.append(Result(key, label, settings, "events/s", summary["raw"], summary[name]))

    elapsed = time.perf_counter() - started
    print(
        f"\nmedians ({publish_rounds} publish rounds, {consume_rounds} consume rounds; "
        f"{elapsed:.1f} s, loop {loop}):\n"
    )
    print(format_table(HEADERS, [_row(r) for r in results]))
    return {
        "environment": environment(loop=loop),
        "quick": args.quick,
        "publish_rounds": publish_rounds,
        "consume_rounds": consume_rounds,
        "sizes": {
            "publish": sizes.publish,
            "batched": sizes.batched,
            "backlog": sizes.backlog,
            "max_outstanding": MAX_OUTSTANDING,
            "fetch_batch": FETCH_BATCH,
            "max_concurrency": MAX_CONCURRENCY,
        },
        "consumer_process": "main",
        "seconds": round(elapsed, 1),
        "scenarios": [r.to_json() for r in results],
    }


HEADERS = [
    "scenario",
    "raw events/s",
    "fw events/s",
    "ratio (fw/raw)",
    "raw p50 ms",
    "fw p50 ms",
    "raw CPU us/ev",
    "fw CPU us/ev",
]


def _row(result: Result) -> list[object]:
    raw, fw = result.raw, result.framework
    return [
        result.name,
        raw.rate,
        fw.rate,
        result.rate_ratio,
        raw.p50_ms or "-",
        fw.p50_ms or "-",
        raw.peer_cpu_us if raw.peer_cpu_us is not None else "-",
        fw.peer_cpu_us if fw.peer_cpu_us is not None else "-",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.events", description=__doc__.split("\n")[0]
    )
    add_common_args(parser)
    ns = parser.parse_args(argv)
    configure_logging(level="WARNING")
    return run_standalone(KEY, benchmark, common_args(ns))


if __name__ == "__main__":
    sys.exit(main())
