"""Every benchmark in one go, with one combined table: what `just bench` runs.

    python -m bench [--quick] [--uvloop] [--rounds N] [--output FILE|-] [--only NAME ...]

Runs `bench.rpc`, `bench.events` and `bench.memory` in turn, each on a fresh
nats-server of its own (so one's JetStream state cannot slow the next), each printing
its own detailed tables; then prints one table of every scenario with the raw nats-py
figure, the framework's, their ratio (framework / raw) and the target it is held to,
marked met or not met. Results are merged into `bench/results.json` under the keys
`rpc`, `events`, `memory` and `summary` (the combined table and the total time).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from bench import events, jobs, memory, rpc
from bench.common import (
    CommonArgs,
    add_common_args,
    common_args,
    format_table,
    merge_results,
    nats_server,
    ratio,
    run_loop,
    wanted_uvloop,
)
from framework import configure_logging

Benchmark = Callable[[str, CommonArgs, bool], Coroutine[Any, Any, dict[str, Any]]]
BENCHMARKS: dict[str, Benchmark] = {
    "rpc": rpc.benchmark,
    "events": events.benchmark,
    "memory": memory.benchmark,
}
IDLE_RSS_LIMIT_MB = 60.0
BOUNDED_GROWTH = 1.10  # peak RSS with 10x the backlog at most 10 % higher


@dataclass(frozen=True)
class Target:
    """What the issue asks of a row: `value` (ratio or absolute) compared to `limit`."""

    text: str
    value: float | None
    limit: float
    at_least: bool

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def _at_least(value: float, limit: float) -> Target:
    return Target(f"ratio >= {limit:g}", value, limit, at_least=True)


def _at_most(value: float, limit: float, text: str | None = None) -> Target:
    return Target(text or f"ratio <= {limit:g}", value, limit, at_least=False)


Row = tuple[str, object, object, object, str, Target | None]


def rpc_rows(data: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    scenarios = {s["concurrency"]: s for s in data["scenarios"]}
    for concurrency, s in sorted(scenarios.items()):
        raw, fw = s["raw"]["rate"], s["framework"]["rate"]
        target = _at_least(ratio(fw, raw), 1.0) if concurrency == 64 else None
        rows.append(
            (f"RPC throughput, {concurrency} in flight", raw, fw, ratio(fw, raw), "req/s", target)
        )
    for concurrency, s in sorted(scenarios.items()):
        raw, fw = s["raw"]["p50_ms"], s["framework"]["p50_ms"]
        target = _at_most(ratio(fw, raw), 1.1) if concurrency == 1 else None
        rows.append(
            (f"RPC p50 latency, {concurrency} in flight", raw, fw, ratio(fw, raw), "ms", target)
        )
    return rows


def events_rows(data: dict[str, Any]) -> list[Row]:
    targets = {"publish batched": 1.0, "consume+ack": 1.0, "consume+ack idempotent": 0.8}
    labels = {
        "publish 1-by-1": "publish 1-by-1 (await each ack)",
        "publish batched": "publish batched",
        "consume+ack": "consume with ack",
        "consume+ack idempotent": "consume with ack, idempotent",
    }
    rows: list[Row] = []
    for s in data["scenarios"]:
        raw, fw = s["raw"]["rate"], s["framework"]["rate"]
        limit = targets.get(s["name"])
        target = _at_least(ratio(fw, raw), limit) if limit is not None else None
        rows.append((labels.get(s["name"], s["name"]), raw, fw, ratio(fw, raw), "events/s", target))
        raw_cpu, fw_cpu = s["raw"]["peer_cpu_us"], s["framework"]["peer_cpu_us"]
        if raw_cpu is not None and fw_cpu is not None:
            rows.append(
                (
                    f"  consumer CPU per event{', idempotent' if 'idempotent' in s['name'] else ''}",
                    raw_cpu,
                    fw_cpu,
                    ratio(fw_cpu, raw_cpu),
                    "us",
                    None,
                )
            )
        if s["name"] == "publish 1-by-1":
            raw_p50, fw_p50 = s["raw"]["p50_ms"], s["framework"]["p50_ms"]
            rows.append(
                ("publish 1-by-1 p50 latency", raw_p50, fw_p50, ratio(fw_p50, raw_p50), "ms", None)
            )
    return rows


def memory_rows(data: dict[str, Any]) -> list[Row]:
    idle = data["idle"]["rss_mb"]
    rows: list[Row] = [
        (
            "idle process RSS",
            idle["raw"],
            idle["framework"],
            ratio(idle["framework"], idle["raw"]),
            "MB",
            _at_most(idle["framework"], IDLE_RSS_LIMIT_MB, f"fw <= {IDLE_RSS_LIMIT_MB:g} MB"),
        )
    ]
    backlog = data["backlog"]
    small, large = backlog["sizes"]
    peaks = backlog["peak_mb"]
    for size in (small, large):
        raw, fw = peaks["raw"][str(size)], peaks["framework"][str(size)]
        rows.append((f"peak RSS draining {size:,} backlog", raw, fw, ratio(fw, raw), "MB", None))
    growth = backlog["growth"]
    rows.append(
        (
            f"peak RSS growth {large // 1000}k vs {small // 1000}k backlog",
            growth["raw"],
            growth["framework"],
            "-",
            "x",
            _at_most(growth["framework"], BOUNDED_GROWTH, f"fw <= {BOUNDED_GROWTH:g}x (bounded)"),
        )
    )
    return rows


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "rpc": rpc_rows,
    "events": events_rows,
    "memory": memory_rows,
}
BENCHMARKS["jobs"], ROWS["jobs"] = jobs.benchmark, jobs.summary_rows  # vs taskiq-nats


def combined_table(results: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    rows: list[Row] = [row for name, data in results.items() for row in ROWS[name](data)]
    table = [
        [
            scenario,
            raw,
            fw,
            fw_ratio,
            unit,
            target.text if target else "-",
            "-" if target is None or target.met is None else ("met" if target.met else "NOT MET"),
        ]
        for scenario, raw, fw, fw_ratio, unit, target in rows
    ]
    headers = ["scenario", "raw", "framework", "ratio (fw/raw)", "unit", "target", "met"]
    records = [dict(zip(headers, row, strict=True)) for row in table]
    return format_table(headers, table), records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        default=list(BENCHMARKS),
        help="run only these benchmarks (default: all)",
    )
    ns = parser.parse_args(argv)
    configure_logging(level="WARNING")
    args = common_args(ns)
    use_uvloop = wanted_uvloop(args.uvloop)
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name in ns.only:
        print(f"\n=== {name} {'=' * (70 - len(name))}\n", flush=True)
        began = time.perf_counter()
        with nats_server() as server:
            results[name] = run_loop(
                BENCHMARKS[name](server.url, args, use_uvloop), use_uvloop=use_uvloop
            )
        seconds[name] = round(time.perf_counter() - began, 1)
        if args.output is not None:
            merge_results(name, results[name], args.output)
    total = round(time.perf_counter() - started, 1)
    table, records = combined_table(results)
    timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    print(f"\n=== all benchmarks {'=' * 56}\n")
    print(
        f"medians of alternating rounds on one machine{' (quick)' if args.quick else ''}; "
        f"total {total:.0f} s ({timing})\n"
    )
    print(table)
    if args.output is not None:
        summary = {
            "quick": args.quick,
            "seconds": total,
            "per_benchmark_s": seconds,
            "rows": records,
        }
        merge_results("summary", summary, args.output)
        print(f"\nresults stored in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
