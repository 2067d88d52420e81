"""What tracing and metrics cost on an in-process RPC echo loop.

    python -m bench.telemetry_overhead [--quick] [--uvloop] [--rounds N] [--calls N]
                                       [--concurrency N] [--output FILE|-]

One nats-server for the whole run. Each measurement runs in a fresh child process
(`python -m bench.telemetry_overhead child MODE URL ...`) holding both a framework
service (`bench.echo`, a struct in, the same struct out, no Context) and a client on
their own connections; a TracerProvider can be installed only once per process, and
`MESH_TRACING` is read at import, so every mode needs a process of its own anyway.
The modes alternate within each round (A B C D A B C D ...), medians are reported:

- `bypass`: `MESH_TRACING=0`, the instrumentation never calls the OpenTelemetry API;
  the baseline.
- `api`: the default, opentelemetry-api only, no SDK: what every user pays.
- `sdk`: SDK TracerProvider (always-on sampling) with a span processor that drops
  every span: spans are created, recorded and ended, `traceparent` is sent; no export.
- `sdk+metrics`: `sdk` plus an SDK MeterProvider with an in-memory reader, so the
  duration histogram really records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import msgspec

from bench.common import (
    ROOT,
    RunStats,
    Summary,
    add_common_args,
    common_args,
    drive,
    environment,
    format_table,
    merge_results,
    nats_server,
    run_loop,
)

MODES = ("bypass", "api", "sdk", "sdk+metrics")
KEY = "telemetry_overhead"


class Payload(msgspec.Struct):
    order_id: str
    amount_cents: int
    note: str


# -- child: one measurement ----------------------------------------------------------


def _install_sdk(mode: str) -> None:
    if mode not in ("sdk", "sdk+metrics"):
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Drop(SpanProcessor):
        """Spans are recorded in full, then dropped: the cost of tracing minus export."""

    provider = TracerProvider()
    provider.add_span_processor(Drop())
    trace.set_tracer_provider(provider)
    if mode == "sdk+metrics":
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


async def measure(url: str, calls: int, concurrency: int, warmup: int) -> RunStats:
    from framework import Service, configure_logging, connect

    configure_logging(level="WARNING")
    svc = Service("bench")

    @svc.rpc("echo")
    async def echo(payload: Payload) -> Payload:
        return payload

    payload = Payload("o-1", 500, "x" * 64)
    async with svc.serve(url), connect(url, name="bench-client") as client:

        async def op() -> object:
            return await client.call("bench.echo", payload, returns=Payload)

        await drive(op, warmup, concurrency)
        return await drive(op, calls, concurrency)


def instrumentation_us(iterations: int = 20000) -> float:
    """Microseconds of instrumentation per RPC, client and server side, no I/O.

    The same calls `Client.call` and `RpcEndpoint._process` make: span name and
    attributes, CLIENT span, traceparent injection, SERVER span from the headers,
    making it current and back, the stats/histogram record, ending both spans.
    """
    import time

    from framework.observability import metrics
    from framework.observability import tracing as telemetry

    attributes = telemetry.handler_attributes("bench", "bench.echo", "bench")
    stats = metrics.stats_for("bench", "echo", "rpc")
    client_kind, server_kind = telemetry.SpanKind.CLIENT, telemetry.SpanKind.SERVER

    def one() -> None:
        span = telemetry.start_send_span("request", "bench.echo", "client", client_kind, None)
        out: dict[str, str] = {}
        if span.get_span_context().is_valid:
            telemetry.inject_context(out, span)
        server = telemetry.start_handler_span("process bench.echo", server_kind, attributes, out)
        token = telemetry.activate(server)
        telemetry.deactivate(token)
        server.end()
        stats.record(1000)
        span.end()

    for _ in range(1000):
        one()
    started = time.perf_counter()
    for _ in range(iterations):
        one()
    return (time.perf_counter() - started) / iterations * 1e6


def child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.telemetry_overhead child")
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("url")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    ns = parser.parse_args(argv)
    _install_sdk(ns.mode)
    stats = run_loop(measure(ns.url, ns.calls, ns.concurrency, ns.warmup), use_uvloop=ns.uvloop)
    print(json.dumps({**asdict(stats), "instrumentation_us": instrumentation_us()}))


# -- parent: alternation and report --------------------------------------------------


micro: dict[str, list[float]] = {mode: [] for mode in MODES}


def run_child(mode: str, url: str, ns: argparse.Namespace, warmup: int) -> RunStats:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESH_"))}
    if mode == "bypass":
        env["MESH_TRACING"] = "0"
    argv = [
        sys.executable,
        "-m",
        "bench.telemetry_overhead",
        "child",
        mode,
        url,
        f"--calls={ns.calls}",
        f"--concurrency={ns.concurrency}",
        f"--warmup={warmup}",
        *(["--uvloop"] if ns.uvloop else []),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    micro[mode].append(result.pop("instrumentation_us"))
    return RunStats(**result)


def overhead(value: float, baseline: float) -> float:
    """Percent throughput lost against the baseline (positive: slower)."""
    return round((1 - value / baseline) * 100, 1) if baseline else 0.0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        child(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry_overhead")
    add_common_args(parser)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    ns = parser.parse_args(argv)
    args = common_args(ns)
    if args.quick:
        ns.calls = min(ns.calls, 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = max(200, ns.calls // 10)

    runs: dict[str, list[RunStats]] = {mode: [] for mode in MODES}
    with nats_server(jetstream=False) as server:
        for index in range(rounds):
            for mode in MODES:
                stats = run_child(mode, server.url, ns, warmup)
                runs[mode].append(stats)
                print(
                    f"round {index + 1} {mode:<12} {stats.rate:>9,.0f} calls/s  "
                    f"p50 {stats.p50_ms:.3f} ms  p99 {stats.p99_ms:.3f} ms",
                    file=sys.stderr,
                )
    summaries = {mode: Summary.of(results) for mode, results in runs.items()}
    base = summaries["bypass"]
    rows: list[list[Any]] = []
    for mode, summary in summaries.items():
        rows.append(
            [
                mode,
                summary.rate,
                overhead(summary.rate, base.rate),
                summary.p50_ms,
                round((summary.p50_ms - base.p50_ms) * 1000, 1),
                summary.p99_ms,
                round(statistics.median(micro[mode]), 2),
            ]
        )
    print(
        f"\nRPC echo, {ns.calls} calls at {ns.concurrency} in flight, "
        f"medians of {rounds} alternated rounds (overhead vs bypass)\n"
    )
    print(
        format_table(
            ["mode", "calls/s", "overhead %", "p50 ms", "p50 +us", "p99 ms", "instr us/RPC"],
            rows,
        )
    )
    if args.output is not None:
        merge_results(
            KEY,
            {
                "calls": ns.calls,
                "concurrency": ns.concurrency,
                "rounds": rounds,
                "modes": {mode: s.to_json() for mode, s in summaries.items()},
                "instrumentation_us_per_rpc": {
                    mode: round(statistics.median(values), 3) for mode, values in micro.items()
                },
                "overhead_pct": {
                    mode: overhead(s.rate, base.rate) for mode, s in summaries.items()
                },
                "environment": environment(loop="uvloop" if ns.uvloop else "asyncio"),
            },
            args.output,
        )


if __name__ == "__main__":
    main()
