"""What every benchmark shares: server, peer processes, timing, alternation, output.

A benchmark run starts one nats-server, then for each scenario runs the raw nats-py
variant and the framework variant alternately (A B A B ...) on that same server, so
drift of the machine (thermal, noisy neighbours) hits both alike; medians of the rounds
are reported. The peer that answers or consumes (a responder, a subscriber) runs in its
own process, started with `python -m <benchmark module> <command> URL`, so the two sides
do not share one event loop or one GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from framework.dev.devserver import NatsServer, find_nats_server

__all__ = [
    "RESULTS_FILE",
    "ROOT",
    "CommonArgs",
    "Peer",
    "RunStats",
    "Summary",
    "add_common_args",
    "alternate",
    "common_args",
    "drive",
    "environment",
    "format_table",
    "loop_name",
    "measure",
    "merge_results",
    "nats_server",
    "ratio",
    "run_loop",
    "uvloop_available",
    "wait_for_stdin_eof",
]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = Path(__file__).resolve().parent / "results.json"


# --- event loop ---------------------------------------------------------------------


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_loop(main: Coroutine[Any, Any, T], *, use_uvloop: bool) -> T:
    """Run `main` on uvloop when asked for (it must be installed), else on plain asyncio."""
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def wanted_uvloop(requested: bool) -> bool:
    """`--uvloop` honoured when uvloop is installed; otherwise say so and use asyncio."""
    if requested and not uvloop_available():
        print(
            "uvloop is not installed (pip install -e '.[uvloop]'): using asyncio", file=sys.stderr
        )
        return False
    return requested


def run_standalone(
    key: str,
    benchmark: Callable[[str, CommonArgs, bool], Coroutine[Any, Any, dict[str, Any]]],
    args: CommonArgs,
) -> int:
    """`python -m bench.<key>`: one benchmark on a fresh server, results merged to file."""
    use_uvloop = wanted_uvloop(args.uvloop)
    with nats_server() as server:
        data = run_loop(benchmark(server.url, args, use_uvloop), use_uvloop=use_uvloop)
    if args.output is not None:
        merge_results(key, data, args.output)
        print(f"\nresults stored under '{key}' in {args.output}")
    return 0


def loop_name() -> str:
    """`uvloop` or `asyncio`: the module of the running loop's class."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


# --- command line -------------------------------------------------------------------


@dataclass(frozen=True)
class CommonArgs:
    quick: bool
    uvloop: bool
    rounds: int | None
    output: Path | None


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer messages: a smoke run")
    parser.add_argument(
        "--uvloop", action="store_true", help="use uvloop in every process (when installed)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per variant")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_FILE,
        help=f"JSON results file, merged into (default {RESULTS_FILE.relative_to(ROOT)}); "
        "'-' to write none",
    )


def common_args(ns: argparse.Namespace) -> CommonArgs:
    output = None if str(ns.output) == "-" else Path(ns.output)
    return CommonArgs(quick=ns.quick, uvloop=ns.uvloop, rounds=ns.rounds, output=output)


# --- server and peers ---------------------------------------------------------------


@contextmanager
def nats_server(*, jetstream: bool = True) -> Iterator[NatsServer]:
    """A fresh nats-server on a free loopback port, removed with its store afterwards."""
    with NatsServer(jetstream=jetstream) as server:
        yield server


class Peer:
    """The other side of a benchmark in its own process: `python -m module *args`.

    The child runs until its standard input closes (`wait_for_stdin_eof`), which also
    ends it when this process dies without cleaning up.
    """

    def __init__(self, module: str, *args: str, use_uvloop: bool = False) -> None:
        self.argv = [sys.executable, "-m", module, *args, *(["--uvloop"] if use_uvloop else [])]
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # service logs; errors still reach stderr
            cwd=ROOT,
            env=env,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the child used so far (Linux /proc; None elsewhere)."""
        if self._proc is None:
            return None
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def check(self) -> None:
        """Raise if the child died (a benchmark must not wait for a dead peer)."""
        if self._proc is not None and self._proc.returncode is not None:
            raise RuntimeError(f"{' '.join(self.argv)} exited with {self._proc.returncode}")

    async def wait_ready(self, probe: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
        """Call `probe` until it returns True (the peer answers), or fail."""
        deadline = time.monotonic() + timeout
        while not await probe():
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.argv)} not ready after {timeout}s")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def wait_for_stdin_eof() -> None:
    """In a peer: return once the parent closes our stdin (or dies)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


# --- timing -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStats:
    """One measured run: throughput, latency percentiles (milliseconds) and the CPU
    time the peer process spent per message (microseconds, when measurable)."""

    count: int
    seconds: float
    rate: float
    p50_ms: float
    p99_ms: float
    peer_cpu_us: float | None = None

    @classmethod
    def of(cls, latencies_ns: Sequence[int], seconds: float) -> RunStats:
        ordered = sorted(latencies_ns)
        return cls(
            count=len(ordered),
            seconds=round(seconds, 4),
            rate=round(len(ordered) / seconds, 1) if seconds > 0 else 0.0,
            p50_ms=round(_percentile(ordered, 50) / 1e6, 4),
            p99_ms=round(_percentile(ordered, 99) / 1e6, 4),
        )


def _percentile(ordered: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


async def drive(op: Callable[[], Awaitable[object]], total: int, concurrency: int) -> RunStats:
    """Run `op` `total` times from `concurrency` tasks, each looping; time every call.

    Latency is per call (perf_counter around the await), so at high concurrency it
    includes waiting in the client's and the peer's queues, as a real caller sees it.
    """
    latencies: list[int] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        clock = time.perf_counter_ns
        record = latencies.append
        while remaining > 0:
            remaining -= 1
            started = clock()
            await op()
            record(clock() - started)

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return RunStats.of(latencies, time.perf_counter() - started)


async def measure(
    peer: Peer, op: Callable[[], Awaitable[object]], total: int, concurrency: int, warmup: int
) -> RunStats:
    """Warm up, then `drive`, also charging the peer's CPU time to the measured calls."""
    if warmup:
        await drive(op, warmup, concurrency)
    cpu_before = peer.cpu_seconds()
    stats = await drive(op, total, concurrency)
    cpu_after = peer.cpu_seconds()
    peer.check()
    if cpu_before is None or cpu_after is None or not stats.count:
        return stats
    return replace(stats, peer_cpu_us=round((cpu_after - cpu_before) / stats.count * 1e6, 2))


# --- alternation and summaries ------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Medians over rounds of one variant, with the rounds themselves."""

    rate: float
    p50_ms: float
    p99_ms: float
    peer_cpu_us: float | None
    rounds: list[RunStats]

    @classmethod
    def of(cls, runs: Sequence[RunStats]) -> Summary:
        cpu = [r.peer_cpu_us for r in runs if r.peer_cpu_us is not None]
        return cls(
            rate=round(statistics.median(r.rate for r in runs), 1),
            p50_ms=round(statistics.median(r.p50_ms for r in runs), 4),
            p99_ms=round(statistics.median(r.p99_ms for r in runs), 4),
            peer_cpu_us=round(statistics.median(cpu), 2) if cpu else None,
            rounds=list(runs),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def alternate(
    variants: Mapping[str, Callable[[], Awaitable[RunStats]]],
    rounds: int,
    *,
    on_run: Callable[[str, int, RunStats], None] | None = None,
) -> dict[str, Summary]:
    """Run the variants in turn (A B A B ...) for `rounds` rounds; medians per variant."""
    runs: dict[str, list[RunStats]] = {name: [] for name in variants}
    for index in range(rounds):
        for name, run in variants.items():
            stats = await run()
            runs[name].append(stats)
            if on_run is not None:
                on_run(name, index + 1, stats)
    return {name: Summary.of(results) for name, results in runs.items()}


def ratio(a: float, b: float) -> float:
    """a / b, rounded, 0 when b is 0."""
    return round(a / b, 3) if b else 0.0


# --- output -------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: numbers right-aligned, text (and the first column) left."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    text = [i == 0 or all(isinstance(row[i], str) for row in rows) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return " | ".join(
            cell.ljust(widths[i]) if text[i] else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        )

    rule = "-+-".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def environment(*, loop: str) -> dict[str, Any]:
    """What the numbers depend on, stored next to them."""

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        server = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        server = None
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loop": loop,
        "nats_server": server,
        "nats_py": version("nats-py"),
        "msgspec": version("msgspec"),
        "anyio": version("anyio"),
        "framework": version("natsmesh-framework"),
    }


def merge_results(key: str, data: Mapping[str, Any], path: Path = RESULTS_FILE) -> None:
    """Store `data` under `key`, keeping the other benchmarks' keys; atomic replace."""
    results: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"warning: {path} unreadable ({exc}); starting it afresh", file=sys.stderr)
        else:
            if isinstance(loaded, dict):
                results = loaded
    results[key] = data
    tmp = path.with_name(path.name + ".tmp")  # gitignored
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
