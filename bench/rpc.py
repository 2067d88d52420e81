"""Request-reply: the framework against the same echo written with raw nats-py.

    python -m bench.rpc [--quick] [--uvloop] [--rounds N] [--output FILE|-]

One nats-server for the whole run. For each concurrency level the raw variant and the
framework variant run alternately (raw, framework, raw, framework, ...), each round
with a freshly started responder process and a fresh caller connection; the table
shows medians of the rounds. A second table gives the responder's CPU time per request
(user + system, from /proc on Linux): on a shared machine it varies much less than
throughput. Only one responder runs at a time, both on `bench.echo` with queue group
`bench`.

- raw responder: `nc.subscribe(cb=...)`, `json.loads`, `msg.respond(json.dumps(...))`;
  raw caller: `nc.request(..., timeout=5)` and `json.loads` of the reply.
- framework responder: `Service("bench")` with `@svc.rpc("echo")` taking and returning
  a `Payload` struct, run with `svc.serve(url)`; framework caller:
  `client.call("bench.echo", Payload(...), returns=Payload)` with the default timeout
  (so, as documented, no Deadline header is sent).

The responders are commands of this module too: `serve-raw URL`, `serve-framework URL`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bench.common import (
    CommonArgs,
    Peer,
    RunStats,
    Summary,
    add_common_args,
    alternate,
    common_args,
    environment,
    format_table,
    loop_name,
    measure,
    ratio,
    run_loop,
    run_standalone,
    wait_for_stdin_eof,
)
from framework import Service, configure_logging, connect

SUBJECT = "bench.echo"
QUEUE = "bench"
REQUEST_TIMEOUT = 5.0


class Payload(msgspec.Struct):
    id: int
    name: str
    amount: float
    tags: list[str]


SAMPLE = Payload(id=42, name="widget", amount=12.5, tags=["red", "green", "blue"])
SAMPLE_DICT: dict[str, Any] = msgspec.to_builtins(SAMPLE)


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int

    @property
    def warmup(self) -> int:
        return max(self.concurrency * 4, self.requests // 10)


FULL = [Scenario("echo c=1", 1, 3000), Scenario("echo c=64", 64, 20000)]
QUICK = [Scenario("echo c=1", 1, 1000), Scenario("echo c=64", 64, 5000)]


# --- responders (run in their own process) ------------------------------------------


async def serve_raw(url: str) -> None:
    nc = await nats.connect(url, name="bench-raw")

    async def echo(msg: Any) -> None:
        request = json.loads(msg.data)
        await msg.respond(json.dumps(request).encode())

    await nc.subscribe(SUBJECT, queue=QUEUE, cb=echo)
    await nc.flush()
    await wait_for_stdin_eof()
    await nc.drain()


def make_service() -> Service:
    svc = Service("bench", description="RPC benchmark echo")

    @svc.rpc("echo")
    async def echo(req: Payload) -> Payload:
        return req

    return svc


async def serve_framework(url: str) -> None:
    async with make_service().serve(url):
        await wait_for_stdin_eof()


# --- callers (run in this process) --------------------------------------------------

Call = Callable[[], Awaitable[None]]
Caller = Callable[[str], AbstractAsyncContextManager[Call]]


async def _answers(nc: Any) -> bool:
    try:
        reply = await nc.request(SUBJECT, json.dumps(SAMPLE_DICT).encode(), timeout=0.5)
    except (NoRespondersError, NatsTimeoutError):
        return False
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        raise RuntimeError(f"responder answered with an error: {reply.headers}")
    if json.loads(reply.data) != SAMPLE_DICT:
        raise RuntimeError(f"responder echoed {reply.data!r}")
    return True


@asynccontextmanager
async def raw_caller(url: str) -> AsyncIterator[Call]:
    nc = await nats.connect(url, name="bench-raw-caller")
    try:

        async def call() -> None:
            reply = await nc.request(
                SUBJECT, json.dumps(SAMPLE_DICT).encode(), timeout=REQUEST_TIMEOUT
            )
            json.loads(reply.data)

        yield call
    finally:
        await nc.close()


@asynccontextmanager
async def framework_caller(url: str) -> AsyncIterator[Call]:
    async with connect(url, name="bench-framework-caller") as client:

        async def call() -> None:
            await client.call(SUBJECT, SAMPLE, returns=Payload)

        if await client.call(SUBJECT, SAMPLE, returns=Payload) != SAMPLE:
            raise RuntimeError("framework responder did not echo the payload")
        yield call


def variant(
    url: str, scenario: Scenario, command: str, caller: Caller, use_uvloop: bool
) -> Callable[[], Awaitable[RunStats]]:
    """One round: start the responder process, wait until it answers, measure, stop it."""

    async def run() -> RunStats:
        async with Peer("bench.rpc", command, url, use_uvloop=use_uvloop) as peer:
            probe = await nats.connect(url, name="bench-probe")
            try:
                await peer.wait_ready(lambda: _answers(probe))
            finally:
                await probe.close()
            async with caller(url) as call:
                return await measure(
                    peer, call, scenario.requests, scenario.concurrency, scenario.warmup
                )

    return run


# --- the benchmark ------------------------------------------------------------------

HEADERS = [
    "scenario",
    "raw req/s",
    "framework req/s",
    "ratio (fw/raw)",
    "raw p50 ms",
    "fw p50 ms",
    "p50 ratio",
    "raw p99 ms",
    "fw p99 ms",
]


async def benchmark(url: str, args: CommonArgs, use_uvloop: bool) -> dict[str, Any]:
    scenarios = QUICK if args.quick else FULL
    rounds = args.rounds or (3 if args.quick else 5)
    loop = loop_name()
    print(
        f"RPC benchmark: {SUBJECT} on {url}, loop {loop} (caller and responders), "
        f"{rounds} rounds per variant, alternating raw/framework",
        flush=True,
    )
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    cpu_rows: list[list[object]] = []
    for scenario in scenarios:
        print(
            f"\n{scenario.name}: {scenario.requests} requests per round, "
            f"{scenario.concurrency} in flight",
            flush=True,
        )

        def report(name: str, index: int, stats: RunStats) -> None:
            cpu = "" if stats.peer_cpu_us is None else f"  responder CPU {stats.peer_cpu_us} us/req"
            print(
                f"  round {index} {name:9} {stats.rate:10,.0f} req/s  "
                f"p50 {stats.p50_ms:.3f} ms  p99 {stats.p99_ms:.3f} ms{cpu}",
                flush=True,
            )

        summary = await alternate(
            {
                "raw": variant(url, scenario, "serve-raw", raw_caller, use_uvloop),
                "framework": variant(
                    url, scenario, "serve-framework", framework_caller, use_uvloop
                ),
            },
            rounds,
            on_run=report,
        )
        raw, fw = summary["raw"], summary["framework"]
        rows.append(_row(scenario, raw, fw))
        if raw.peer_cpu_us is not None and fw.peer_cpu_us is not None:
            cpu_rows.append(
                [
                    scenario.name,
                    raw.peer_cpu_us,
                    fw.peer_cpu_us,
                    ratio(fw.peer_cpu_us, raw.peer_cpu_us),
                ]
            )
        results.append(
            {
                "name": scenario.name,
                "concurrency": scenario.concurrency,
                "requests": scenario.requests,
                "raw": raw.to_json(),
                "framework": fw.to_json(),
                "rate_ratio": ratio(fw.rate, raw.rate),
                "p50_ratio": ratio(fw.p50_ms, raw.p50_ms),
                "p99_ratio": ratio(fw.p99_ms, raw.p99_ms),
                "responder_cpu_ratio": (
                    ratio(fw.peer_cpu_us, raw.peer_cpu_us)
                    if fw.peer_cpu_us is not None and raw.peer_cpu_us is not None
                    else None
                ),
            }
        )
    elapsed = time.perf_counter() - started
    print(f"\nmedians of {rounds} rounds ({elapsed:.1f} s, loop {loop}):\n")
    print(format_table(HEADERS, rows))
    if cpu_rows:
        print("\nresponder CPU time per request (us, user+system, medians):\n")
        print(format_table(["scenario", "raw", "framework", "ratio (fw/raw)"], cpu_rows))
    return {
        "environment": environment(loop=loop),
        "rounds": rounds,
        "quick": args.quick,
        "seconds": round(elapsed, 1),
        "scenarios": results,
    }


def _row(scenario: Scenario, raw: Summary, fw: Summary) -> list[object]:
    return [
        scenario.name,
        raw.rate,
        fw.rate,
        ratio(fw.rate, raw.rate),
        raw.p50_ms,
        fw.p50_ms,
        ratio(fw.p50_ms, raw.p50_ms),
        raw.p99_ms,
        fw.p99_ms,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rpc", description=__doc__.split("\n")[0])
    add_common_args(parser)
    sub = parser.add_subparsers(dest="command")
    for command in ("serve-raw", "serve-framework"):
        serve = sub.add_parser(command, help="run a responder until stdin closes")
        serve.add_argument("url")
        serve.add_argument("--uvloop", action="store_true", default=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    # As `Service.run` would, but quiet: per-connection debug lines are noise here.
    configure_logging(level="WARNING")
    use_uvloop = bool(ns.uvloop)
    if ns.command == "serve-raw":
        run_loop(serve_raw(ns.url), use_uvloop=use_uvloop)
        return 0
    if ns.command == "serve-framework":
        run_loop(serve_framework(ns.url), use_uvloop=use_uvloop)
        return 0
    return run_standalone("rpc", benchmark, common_args(ns))


if __name__ == "__main__":
    sys.exit(main())
