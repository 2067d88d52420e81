"""Request-reply: what users write with the framework against the same with raw nats-py.

    python -m bench.rpc [--quick] [--uvloop] [--rounds N] [--output FILE|-]

One nats-server for the whole run. Each scenario runs its variants alternately (raw,
framework, raw, framework, ...), each round with a freshly started responder process
(the server and this caller are separate processes too) and a fresh caller
connection; the tables show medians of the rounds and the responder's CPU time per
request (user + system, from /proc on Linux; it varies much less than throughput on a
shared machine).

Scenarios (the framework at its defaults, as the README shows the API):

- **call**, 1 and 64 in flight. Raw: a responder `nc.subscribe(subject, queue=...,
  cb=...)` with `json.loads` and `msg.respond(json.dumps(...))`; caller
  `nc.request(subject, data, timeout=10)` and `json.loads` of the reply. Framework:
  `@svc.rpc("echo")` taking and returning a `Payload` struct, served with
  `svc.serve(url)`; caller `client.call(subject, payload, returns=Payload, timeout=10)`
  (so a `Deadline` header goes with every request, as with every careful caller).
- **call without timeout** (extra, tuned row), 64 in flight: `client.call(subject,
  payload, returns=Payload)`: the default timeout stays local, no header is sent.
- **in-mesh call**, 64 in flight: a handler that calls another service and answers
  with its reply. Both services run in one responder process (as `mesh run front
  back` runs them), each on its own connection. Framework: `@front.rpc("relay")`
  doing `await ctx.call("bench.echo", req, returns=Payload, timeout=10)`; raw: a
  callback that spawns a task per request (a nats-py callback runs one message at a
  time) which sends `Correlation-Id`, `Deadline` (the caller's, passed on) and
  `traceparent` by hand with `nc.request(..., headers=...)`. The caller is the same
  for both: `client.call("front.relay", ..., timeout=10, correlation_id=...,
  headers={"traceparent": ...})`, so each hop carries a correlation id, a deadline
  and trace context (the framework passes an incoming trace on without an SDK).

The responders are commands of this module too: `serve-raw URL`, `serve-framework
URL`, `serve-relay-raw URL`, `serve-relay-framework URL`.
"""

from __future__ import annotations

import argparse
import asyncio
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
from framework import Client, Context, Service, configure_logging, connect

SUBJECT = "bench.echo"
QUEUE = "bench"
RELAY_SUBJECT = "front.relay"
RELAY_QUEUE = "front"
TIMEOUT = 10.0
# a sampled W3C trace context, as an upstream traced service would send it
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Payload(msgspec.Struct):
    id: int
    name: str
    amount: float
    tags: list[str]


SAMPLE = Payload(id=42, name="widget", amount=12.5, tags=["red", "green", "blue"])
SAMPLE_DICT: dict[str, Any] = msgspec.to_builtins(SAMPLE)


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


def make_front() -> Service:
    front = Service("front", description="RPC benchmark relay: calls bench.echo")

    @front.rpc("relay")
    async def relay(req: Payload, ctx: Context) -> Payload:
        return await ctx.call(SUBJECT, req, returns=Payload, timeout=TIMEOUT)

    return front


async def serve_relay_framework(url: str) -> None:
    async with make_service().serve(url), make_front().serve(url):
        await wait_for_stdin_eof()


_FORWARDED = ("Correlation-Id", "traceparent", "tracestate")


async def serve_relay_raw(url: str) -> None:
    """The in-mesh call by hand: the headers a careful nats-py user passes on."""
    back = await nats.connect(url, name="bench-raw-back")
    nc = await nats.connect(url, name="bench-raw-front")
    tasks: set[asyncio.Task[None]] = set()

    async def echo(msg: Any) -> None:
        request = json.loads(msg.data)
        await msg.respond(json.dumps(request).encode())

    async def relay(msg: Any) -> None:
        incoming = msg.headers or {}
        headers = {name: incoming[name] for name in _FORWARDED if name in incoming}
        timeout = TIMEOUT
        deadline = incoming.get("Deadline")
        if deadline is not None:
            timeout = min(timeout, int(deadline) / 1000 - time.time())
        else:
            deadline = str(int((time.time() + timeout) * 1000))
        headers["Deadline"] = deadline
        request = json.loads(msg.data)
        reply = await nc.request(
            SUBJECT, json.dumps(request).encode(), timeout=timeout, headers=headers
        )
        await msg.respond(json.dumps(json.loads(reply.data)).encode())

    async def spawn(msg: Any) -> None:
        task = asyncio.ensure_future(relay(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await back.subscribe(SUBJECT, queue=QUEUE, cb=echo)
    await nc.subscribe(RELAY_SUBJECT, queue=RELAY_QUEUE, cb=spawn)
    await back.flush()
    await nc.flush()
    await wait_for_stdin_eof()
    await nc.drain()
    await back.drain()


RESPONDERS: dict[str, Callable[[str], Awaitable[None]]] = {
    "serve-raw": serve_raw,
    "serve-framework": serve_framework,
    "serve-relay-raw": serve_relay_raw,
    "serve-relay-framework": serve_relay_framework,
}


# --- callers (run in this process) --------------------------------------------------

Call = Callable[[], Awaitable[None]]
Caller = Callable[[str], AbstractAsyncContextManager[Call]]


async def answers(nc: Any, subject: str) -> bool:
    """The responder is up and echoes (the readiness probe of a round)."""
    try:
        reply = await nc.request(subject, json.dumps(SAMPLE_DICT).encode(), timeout=0.5)
    except (NoRespondersError, NatsTimeoutError):
        return False
    if reply.headers and "Nats-Service-Error-Code" in reply.headers:
        if reply.headers["Nats-Service-Error-Code"] in ("503", "404"):
            return False  # the relay's back end is still subscribing
        raise RuntimeError(f"responder answered with an error: {reply.headers}")
    if json.loads(reply.data) != SAMPLE_DICT:
        raise RuntimeError(f"responder echoed {reply.data!r}")
    return True


@asynccontextmanager
async def raw_caller(url: str) -> AsyncIterator[Call]:
    nc = await nats.connect(url, name="bench-raw-caller")
    try:

        async def call() -> None:
            reply = await nc.request(SUBJECT, json.dumps(SAMPLE_DICT).encode(), timeout=TIMEOUT)
            json.loads(reply.data)

        yield call
    finally:
        await nc.close()


@asynccontextmanager
async def framework_caller(url: str) -> AsyncIterator[Call]:
    """What the README shows: a typed call with a timeout."""
    async with connect(url, name="bench-framework-caller") as client:

        async def call() -> None:
            await client.call(SUBJECT, SAMPLE, returns=Payload, timeout=TIMEOUT)

        if await client.call(SUBJECT, SAMPLE, returns=Payload, timeout=TIMEOUT) != SAMPLE:
            raise RuntimeError("framework responder did not echo the payload")
        yield call


@asynccontextmanager
async def framework_caller_no_timeout(url: str) -> AsyncIterator[Call]:
    """The tuned variant: no `timeout=`, so no Deadline header."""
    async with connect(url, name="bench-framework-caller") as client:

        async def call() -> None:
            await client.call(SUBJECT, SAMPLE, returns=Payload)

        yield call


def relay_call(client: Client) -> Call:
    """One call into the relay, with a correlation id, a deadline and trace context."""
    count = 0
    traced = {"traceparent": TRACEPARENT}

    async def call() -> None:
        nonlocal count
        count += 1
        await client.call(
            RELAY_SUBJECT,
            SAMPLE,
            returns=Payload,
            timeout=TIMEOUT,
            correlation_id=f"req-{count}",
            headers=traced,
        )

    return call


@asynccontextmanager
async def relay_caller(url: str) -> AsyncIterator[Call]:
    """The same caller for both relays: only the handler's onward call differs."""
    async with connect(url, name="bench-relay-caller") as client:
        yield relay_call(client)


# --- scenarios ----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One side of a comparison: the responder command and the caller."""

    responder: str
    caller: Caller


@dataclass(frozen=True)
class Row:
    """A framework variant compared with the raw one of its scenario."""

    key: str  # stable id, what `bench.__main__` attaches targets to
    label: str  # what the tables show
    settings: str  # what the framework variant used, for the README table
    variant: str  # the framework variant's name in the scenario


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    requests: int
    variants: dict[str, Variant]  # "raw" first, then the framework variants
    rows: tuple[Row, ...]

    @property
    def warmup(self) -> int:
        return max(self.concurrency * 4, self.requests // 10)


RAW = Variant("serve-raw", raw_caller)
DEFAULT = Variant("serve-framework", framework_caller)
NO_TIMEOUT = Variant("serve-framework", framework_caller_no_timeout)
RELAY_RAW = Variant("serve-relay-raw", relay_caller)
RELAY = Variant("serve-relay-framework", relay_caller)
CALL = "call(subject, req, returns=T, timeout=10); @svc.rpc defaults"


def scenarios(quick: bool) -> list[Scenario]:
    one, many = (1000, 5000) if quick else (3000, 20000)
    return [
        Scenario(
            "call c=1",
            1,
            one,
            {"raw": RAW, "framework": DEFAULT},
            (Row("call_c1", "call with timeout, 1 in flight", CALL, "framework"),),
        ),
        Scenario(
            "call c=64",
            64,
            many,
            {"raw": RAW, "framework": DEFAULT, "no timeout": NO_TIMEOUT},
            (
                Row("call_c64", "call with timeout, 64 in flight", CALL, "framework"),
                Row(
                    "call_c64_no_timeout",
                    "call without timeout (tuned), 64 in flight",
                    "call(subject, req, returns=T): no Deadline header",
                    "no timeout",
                ),
            ),
        ),
        Scenario(
            "ctx.call c=64",
            64,
            many // 2,
            {"raw": RELAY_RAW, "framework": RELAY},
            (
                Row(
                    "relay_c64",
                    "in-mesh ctx.call with headers, 64 in flight",
                    "ctx.call(subject, req, returns=T, timeout=10) in an @rpc handler; "
                    "Correlation-Id, Deadline, traceparent on the wire",
                    "framework",
                ),
            ),
        ),
    ]


def variant(
    url: str, scenario: Scenario, spec: Variant, use_uvloop: bool
) -> Callable[[], Awaitable[RunStats]]:
    """One round: start the responder process, wait until it answers, measure, stop it."""
    subject = RELAY_SUBJECT if "relay" in spec.responder else SUBJECT

    async def run() -> RunStats:
        async with Peer("bench.rpc", spec.responder, url, use_uvloop=use_uvloop) as peer:
            probe = await nats.connect(url, name="bench-probe")
            try:
                await peer.wait_ready(lambda: answers(probe, subject))
            finally:
                await probe.close()
            async with spec.caller(url) as call:
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


def _report(name: str, index: int, stats: RunStats) -> None:
    cpu = "" if stats.peer_cpu_us is None else f"  responder CPU {stats.peer_cpu_us} us/req"
    print(
        f"  round {index} {name:10} {stats.rate:10,.0f} req/s  "
        f"p50 {stats.p50_ms:.3f} ms  p99 {stats.p99_ms:.3f} ms{cpu}",
        flush=True,
    )


def _result(scenario: Scenario, row: Row, raw: Summary, fw: Summary) -> dict[str, Any]:
    return {
        "key": row.key,
        "name": row.label,
        "settings": row.settings,
        "scenario": scenario.name,
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


async def benchmark(url: str, args: CommonArgs, use_uvloop: bool) -> dict[str, Any]:
    rounds = args.rounds or (3 if args.quick else 5)
    loop = loop_name()
    print(
        f"RPC benchmark on {url}, loop {loop} (caller and responders), "
        f"{rounds} rounds per variant, alternating raw/framework",
        flush=True,
    )
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    cpu_rows: list[list[object]] = []
    for scenario in scenarios(args.quick):
        print(
            f"\n{scenario.name}: {scenario.requests} requests per round, "
            f"{scenario.concurrency} in flight",
            flush=True,
        )
        summary = await alternate(
            {
                name: variant(url, scenario, spec, use_uvloop)
                for name, spec in scenario.variants.items()
            },
            rounds,
            on_run=_report,
        )
        raw = summary["raw"]
        for row in scenario.rows:
            fw = summary[row.variant]
            results.append(_result(scenario, row, raw, fw))
            rows.append(_row(row.label, raw, fw))
            if raw.peer_cpu_us is not None and fw.peer_cpu_us is not None:
                cpu_rows.append(
                    [
                        row.label,
                        raw.peer_cpu_us,
                        fw.peer_cpu_us,
                        ratio(fw.peer_cpu_us, raw.peer_cpu_us),
                    ]
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


def _row(label: str, raw: Summary, fw: Summary) -> list[object]:
    return [
        label,
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
    for command in RESPONDERS:
        serve = sub.add_parser(command, help="run a responder until stdin closes")
        serve.add_argument("url")
        serve.add_argument("--uvloop", action="store_true", default=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    # As `Service.run` would, but quiet: per-connection debug lines are noise here.
    configure_logging(level="WARNING")
    if ns.command in RESPONDERS:
        run_loop(RESPONDERS[ns.command](ns.url), use_uvloop=bool(ns.uvloop))
        return 0
    return run_standalone("rpc", benchmark, common_args(ns))


if __name__ == "__main__":
    sys.exit(main())
