"""Memory: resident set size of framework processes against raw nats-py ones.

    python -m bench.memory [--quick] [--uvloop] [--rounds N] [--output FILE|-]

One nats-server for the whole run. Every measured process is a child of this one
(`bench.common.Peer`): framework processes run `python -m bench.memory <command> URL`,
raw ones `python -m bench.raw_peer ...`, which imports nothing but nats-py (this module
imports the framework, and a raw process must not carry it). RSS is VmRSS from
`/proc/<pid>/status` (Linux only); for peaks also VmHWM, the kernel's high-water mark,
which no sampling interval can miss (the tables show VmHWM).

- idle: a framework `Service` with 2 RPC endpoints and 1 event subscriber (default
  options: idempotent, so it also opens its processed-ids bucket) against a raw
  nats-py process holding one connection and one subscription. Measured 2 s after the
  process first answers (`$SRV.PING` for the service, a request on its subject for
  raw). Rounds alternate raw/framework; medians.
- backlog drain: a stream is filled with a backlog (10,000 and 100,000 events; 2,000
  and 20,000 with --quick), then a consumer process is started that drains it:
  framework = a `Service` with one `@subscribe(type, idempotent=False,
  max_concurrency=64)` handler that does nothing; raw = `pull_subscribe` and a
  `fetch(batch=128)` loop with `json.loads` and `ack`. RSS is sampled every 100 ms
  until the consumer reports nothing pending and nothing unacknowledged. If memory is
  bounded, the peak with the large backlog is about the peak with the small one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError

from bench.common import (
    CommonArgs,
    Peer,
    add_common_args,
    common_args,
    environment,
    format_table,
    loop_name,
    ratio,
    run_loop,
    run_standalone,
    wait_for_stdin_eof,
)
from framework import Context, Service, configure_logging

KEY = "memory"
STREAM = "EVENTS_BENCH"
STREAM_SUBJECTS = ["events.bench.>"]
IDLE_SERVICE = "memidle"
IDLE_EVENT_TYPE = "bench.idle.created.v1"
RAW_PING = "bench.memory.ping"
DRAIN_SERVICE = "memdrain"
IDLE_SECONDS = 2.0
SAMPLE_EVERY = 0.1
MAX_CONCURRENCY = 64
FETCH_BATCH = 128
FILL_OUTSTANDING = 1024
DRAIN_TIMEOUT = 120.0

FULL_BACKLOGS = (10_000, 100_000)
QUICK_BACKLOGS = (2_000, 20_000)


class Item(msgspec.Struct):
    id: int
    name: str
    amount: float
    tags: list[str]


# --- /proc --------------------------------------------------------------------------


def proc_status_kb(pid: int, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), None when unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def mb(kb: int | None) -> float:
    return round(kb / 1024, 1) if kb else 0.0


# --- peers (run in their own process) -----------------------------------------------


def make_idle_service() -> Service:
    svc = Service(IDLE_SERVICE, description="memory benchmark: idle service")

    @svc.rpc("echo")
    async def echo(req: Item) -> Item:
        return req

    @svc.rpc("total")
    async def total(req: list[Item], ctx: Context) -> float:
        return sum(item.amount for item in req)

    @svc.subscribe(IDLE_EVENT_TYPE)
    async def on_item(event: Item, ctx: Context) -> None:
        return None

    return svc


async def idle_framework(url: str) -> None:
    async with make_idle_service().serve(url):
        await wait_for_stdin_eof()


async def drain_framework(url: str, event_type: str, name: str) -> None:
    svc = Service(DRAIN_SERVICE, description="memory benchmark: backlog drain")

    @svc.subscribe(event_type, name=name, idempotent=False, max_concurrency=MAX_CONCURRENCY)
    async def handle(event: Item) -> None:
        return None

    async with svc.serve(url):
        await wait_for_stdin_eof()


# --- measurements (in this process) -------------------------------------------------


@dataclass(frozen=True)
class Idle:
    rss_mb: float
    hwm_mb: float


async def _answers(nc: Any, subject: str) -> bool:
    try:
        await nc.request(subject, b"", timeout=0.5)
    except (NoRespondersError, NatsTimeoutError):
        return False
    return True


def idle_variant(url: str, peer: Peer, probe_subject: str) -> Callable[[], Awaitable[Idle]]:
    """One round: start the process, wait until it answers, let it idle, read its RSS."""

    async def run() -> Idle:
        async with peer:
            nc = await nats.connect(url, name="bench-memory-probe")
            try:
                await peer.wait_ready(lambda: _answers(nc, probe_subject))
            finally:
                await nc.close()
            await asyncio.sleep(IDLE_SECONDS)
            peer.check()
            assert peer.pid is not None
            return Idle(
                rss_mb=mb(proc_status_kb(peer.pid, "VmRSS")),
                hwm_mb=mb(proc_status_kb(peer.pid, "VmHWM")),
            )

    return run


@dataclass(frozen=True)
class Drain:
    backlog: int
    peak_rss_mb: float  # highest VmRSS sampled every SAMPLE_EVERY
    hwm_mb: float  # VmHWM at the end: the true peak
    end_rss_mb: float
    seconds: float  # from the start of the process until everything was acked
    samples: int


async def fill(js: Any, subject: str, event_type: str, count: int) -> float:
    """Store `count` events with the headers the framework would send (untimed part)."""
    started = time.perf_counter()
    failures = 0

    def settled(future: asyncio.Future[Any]) -> None:
        nonlocal failures
        if future.cancelled() or future.exception() is not None:
            failures += 1

    prefix = os.urandom(6).hex()
    for i in range(count):
        event_id = f"{prefix}-{i}"
        body = msgspec.json.encode(Item(i, "widget", 12.5, ["red", "green", "blue"]))
        headers = {
            "Nats-Msg-Id": event_id,
            "Event-Type": event_type,
            "Event-Time": "2026-01-01T00:00:00.000Z",
            "Correlation-Id": event_id,
            "Producer": "bench-filler",
        }
        future = await js.publish_async(subject, body, headers=headers)
        future.add_done_callback(settled)
    await asyncio.wait_for(js.publish_async_completed(), 60)
    if failures:
        raise RuntimeError(f"fill: {failures} events not stored")
    return time.perf_counter() - started


async def drain(js: Any, peer: Peer, durable: str, backlog: int, last_seq: int) -> Drain:
    """Sample the peer's RSS until its consumer has taken and acked the whole backlog."""
    started = time.perf_counter()
    peak = 0
    samples = 0
    deadline = time.monotonic() + DRAIN_TIMEOUT
    async with peer:
        assert peer.pid is not None
        pid = peer.pid
        while True:
            await asyncio.sleep(SAMPLE_EVERY)
            peer.check()
            rss = proc_status_kb(pid, "VmRSS") or 0
            peak = max(peak, rss)
            samples += 1
            try:
                info = await js.consumer_info(STREAM, durable, timeout=1)
            except (NotFoundError, NatsTimeoutError):
                info = None
            if (
                info is not None
                and info.delivered.stream_seq >= last_seq
                and not info.num_pending
                and not info.num_ack_pending
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{durable}: backlog of {backlog} not drained")
        seconds = time.perf_counter() - started
        hwm = proc_status_kb(pid, "VmHWM")
        end = proc_status_kb(pid, "VmRSS")
    await js.delete_consumer(STREAM, durable)
    return Drain(backlog, mb(peak), mb(hwm), mb(end), round(seconds, 2), samples)


async def backlog_runs(url: str, backlogs: tuple[int, ...], use_uvloop: bool) -> dict[str, Any]:
    """Fill one subject per backlog size, then drain each with raw and framework."""
    nc = await nats.connect(url, name="bench-memory-admin")
    runs: dict[str, list[Drain]] = {"raw": [], "framework": []}
    try:
        js = nc.jetstream(publish_async_max_pending=FILL_OUTSTANDING)
        try:
            await js.stream_info(STREAM)
        except NotFoundError:
            await js.add_stream(
                api.StreamConfig(
                    name=STREAM,
                    subjects=STREAM_SUBJECTS,
                    storage=api.StorageType.FILE,
                    duplicate_window=120.0,
                    allow_direct=True,
                )
            )
        for backlog in backlogs:
            event_type = f"bench.backlog{backlog}.created.v1"
            subject = f"events.{event_type}"
            seconds = await fill(js, subject, event_type, backlog)
            info = await js.stream_info(STREAM)
            last_seq = info.state.last_seq
            print(f"  backlog {backlog}: filled in {seconds:.1f} s (untimed)", flush=True)
            for variant in ("raw", "framework"):
                if variant == "raw":
                    durable = f"raw_drain_{backlog}"
                    peer = Peer(
                        "bench.raw_peer",
                        "drain",
                        url,
                        subject,
                        STREAM,
                        durable,
                        str(FETCH_BATCH),
                        use_uvloop=use_uvloop,
                    )
                else:
                    name = f"drain_{backlog}"
                    durable = f"{DRAIN_SERVICE}_{name}"
                    peer = Peer(
                        "bench.memory",
                        "drain-framework",
                        url,
                        event_type,
                        name,
                        use_uvloop=use_uvloop,
                    )
                result = await drain(js, peer, durable, backlog, last_seq)
                runs[variant].append(result)
                print(
                    f"  backlog {backlog:>7,} {variant:9} peak RSS {result.peak_rss_mb:6.1f} MB "
                    f"(VmHWM {result.hwm_mb:.1f}, at end {result.end_rss_mb:.1f}), "
                    f"drained in {result.seconds:.1f} s, {result.samples} samples",
                    flush=True,
                )
            await js.purge_stream(STREAM, subject=subject)
    finally:
        await nc.close()
    return {name: [asdict(d) for d in drains] for name, drains in runs.items()}


def _require_proc() -> None:
    if not Path("/proc/self/status").exists():
        raise RuntimeError("the memory benchmark reads /proc/<pid>/status (Linux only)")


# --- the benchmark ------------------------------------------------------------------


async def benchmark(url: str, args: CommonArgs, use_uvloop: bool = False) -> dict[str, Any]:
    _require_proc()
    rounds = args.rounds or (1 if args.quick else 2)
    backlogs = QUICK_BACKLOGS if args.quick else FULL_BACKLOGS
    loop = loop_name()
    started = time.perf_counter()
    print(
        f"Memory benchmark on {url}, loop {loop}: idle RSS after {IDLE_SECONDS:.0f} s "
        f"({rounds} rounds, alternating), then peak RSS draining backlogs of "
        f"{' and '.join(f'{b:,}' for b in backlogs)} events",
        flush=True,
    )
    variants = {
        "raw": idle_variant(
            url, Peer("bench.raw_peer", "idle", url, RAW_PING, use_uvloop=use_uvloop), RAW_PING
        ),
        "framework": idle_variant(
            url,
            Peer("bench.memory", "idle-framework", url, use_uvloop=use_uvloop),
            f"$SRV.PING.{IDLE_SERVICE}",
        ),
    }
    idle: dict[str, list[Idle]] = {name: [] for name in variants}
    for index in range(rounds):
        for name, run in variants.items():
            result = await run()
            idle[name].append(result)
            print(
                f"  round {index + 1} idle {name:9} RSS {result.rss_mb:.1f} MB "
                f"(VmHWM {result.hwm_mb:.1f})",
                flush=True,
            )
    idle_rss = {name: statistics.median(r.rss_mb for r in rs) for name, rs in idle.items()}
    drains = await backlog_runs(url, backlogs, use_uvloop)
    elapsed = time.perf_counter() - started

    small, large = backlogs
    rows: list[list[object]] = [
        [
            "idle RSS",
            idle_rss["raw"],
            idle_rss["framework"],
            ratio(idle_rss["framework"], idle_rss["raw"]),
        ]
    ]
    peaks: dict[str, dict[int, float]] = {
        name: {d["backlog"]: d["hwm_mb"] for d in ds} for name, ds in drains.items()
    }
    for backlog in backlogs:
        rows.append(
            [
                f"drain {backlog:,} peak RSS",
                peaks["raw"][backlog],
                peaks["framework"][backlog],
                ratio(peaks["framework"][backlog], peaks["raw"][backlog]),
            ]
        )
    growth = {name: ratio(p[large], p[small]) for name, p in peaks.items()}
    print(f"\nmemory ({elapsed:.1f} s; MB, peaks are VmHWM):\n")
    print(format_table(["scenario", "raw MB", "framework MB", "ratio (fw/raw)"], rows))
    print(
        f"\npeak growth from {small:,} to {large:,} backlog: raw x{growth['raw']:.3f}, "
        f"framework x{growth['framework']:.3f}"
    )
    return {
        "environment": environment(loop=loop),
        "quick": args.quick,
        "rounds": rounds,
        "seconds": round(elapsed, 1),
        "idle": {
            "raw": [asdict(r) for r in idle["raw"]],
            "framework": [asdict(r) for r in idle["framework"]],
            "rss_mb": idle_rss,
            "ratio": ratio(idle_rss["framework"], idle_rss["raw"]),
        },
        "backlog": {
            "sizes": list(backlogs),
            "sample_every_s": SAMPLE_EVERY,
            "framework_options": {"idempotent": False, "max_concurrency": MAX_CONCURRENCY},
            "raw_fetch_batch": FETCH_BATCH,
            "runs": drains,
            "peak_mb": {name: {str(k): v for k, v in p.items()} for name, p in peaks.items()},
            "growth": growth,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__.split("\n")[0]
    )
    add_common_args(parser)
    sub = parser.add_subparsers(dest="command")
    for command, extra in (("idle-framework", ()), ("drain-framework", ("event_type", "name"))):
        peer = sub.add_parser(command, help="a measured process; runs until stdin closes")
        peer.add_argument("url")
        for name in extra:
            peer.add_argument(name)
        peer.add_argument("--uvloop", action="store_true", default=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    configure_logging(level="WARNING")
    use_uvloop = bool(ns.uvloop)
    if ns.command is not None:
        if ns.command == "idle-framework":
            main_coro = idle_framework(ns.url)
        else:
            main_coro = drain_framework(ns.url, ns.event_type, ns.name)
        run_loop(main_coro, use_uvloop=use_uvloop)
        return 0
    return run_standalone(KEY, benchmark, common_args(ns))


if __name__ == "__main__":
    sys.exit(main())
