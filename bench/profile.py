"""Workloads to profile: the framework alone, at its defaults, for a fixed time.

    python -m bench.profile consume [--seconds S]   # default subscriber draining a backlog
    python -m bench.profile call [--seconds S]      # client.call(timeout=10), 64 in flight
    python -m bench.profile relay [--seconds S]     # ctx.call from a handler, with headers

Meant to run under py-spy, e.g.

    py-spy record -f raw -o consume.txt -- python -m bench.profile consume
    py-spy record -f raw -o call.txt --subprocesses -- python -m bench.profile call
    python -m bench.profile top consume.txt        # self and inclusive time, top rows

Each starts its own nats-server. `consume` runs the subscriber in this process (as
`bench.events` does); `call` and `relay` run the responders in a child process (as
`bench.rpc` does), so `--subprocesses` profiles both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import nats

from bench import events, rpc
from bench.common import Peer, nats_server
from framework import Service, configure_logging, connect


async def consume(url: str, seconds: float) -> None:
    """Drain a 20,000-event backlog again and again with `@svc.subscribe(type)`."""
    admin = await nats.connect(url)
    await events.ensure_stream(admin.jetstream())
    drain = events.Consume(url, 20000)
    await drain.open()
    await drain.fill()
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        stats = await drain.framework_default()()
        rounds += 1
        print(f"round {rounds}: {stats.rate:,.0f} events/s", flush=True)
    await drain.close()
    await admin.close()


async def call(url: str, seconds: float, command: str = "serve-framework") -> None:
    """`client.call(subject, req, returns=T, timeout=10)` from 64 tasks."""
    async with Peer("bench.rpc", command, url) as peer:
        probe = await nats.connect(url)
        await peer.wait_ready(lambda: rpc.answers(probe, rpc.SUBJECT))
        await probe.close()
        async with connect(url) as client:
            end = time.monotonic() + seconds
            count = 0

            async def worker() -> None:
                nonlocal count
                while time.monotonic() < end:
                    await client.call(rpc.SUBJECT, rpc.SAMPLE, returns=rpc.Payload, timeout=10)
                    count += 1

            await asyncio.gather(*(worker() for _ in range(64)))
            print(f"{count / seconds:,.0f} calls/s", flush=True)


async def relay(url: str, seconds: float) -> None:
    """The in-mesh call: a handler relaying with `ctx.call` (see `bench.rpc`)."""
    async with Peer("bench.rpc", "serve-relay-framework", url) as peer:
        probe = await nats.connect(url)
        await peer.wait_ready(lambda: rpc.answers(probe, rpc.RELAY_SUBJECT))
        await probe.close()
        async with connect(url) as client:
            end = time.monotonic() + seconds
            count = 0
            relay_call = rpc.relay_call(client)

            async def worker() -> None:
                nonlocal count
                while time.monotonic() < end:
                    await relay_call()
                    count += 1

            await asyncio.gather(*(worker() for _ in range(64)))
            print(f"{count / seconds:,.0f} relayed calls/s", flush=True)


def top(path: Path, rows: int = 25) -> str:
    """Self and inclusive share of samples per function, per process, from py-spy's
    raw output (`--subprocesses` adds a `process N:"command"` frame)."""
    own: dict[str, Counter[str]] = {}
    inclusive: dict[str, Counter[str]] = {}
    totals: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        process = _process(processes[-1]) if processes else "main"
        frames = [_short(f) for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        totals[process] += count
        own.setdefault(process, Counter())[frames[-1]] += count
        for frame in set(frames):
            inclusive.setdefault(process, Counter())[frame] += count
    out: list[str] = []
    for process, total in totals.most_common():
        out += [f"== {process}: {total} samples", "", "  self%  function"]
        out += [f"{100 * n / total:6.1f}  {name}" for name, n in own[process].most_common(rows)]
        out += ["", "  incl%  function"]
        out += [
            f"{100 * n / total:6.1f}  {name}" for name, n in inclusive[process].most_common(rows)
        ]
        out.append("")
    return "\n".join(out)


def _process(frame: str) -> str:
    """`process 12:"python -m bench.rpc serve-framework URL"` -> `bench.rpc serve-framework`."""
    command = frame.partition(":")[2].strip('"')
    words = [w for w in command.split() if not w.startswith(("nats://", "/"))]
    return " ".join(words[2:] if words[:1] == ["-m"] else words) or "main"


def _short(frame: str) -> str:
    """`fn (path/to/module.py:12)` -> `fn (module.py)`: lines of one function merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else file
    return f"{name} ({short})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("workload", choices=["consume", "call", "call-raw", "relay", "top"])
    parser.add_argument("file", nargs="?", type=Path, help="py-spy raw output (for top)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=25)
    ns = parser.parse_args(argv)
    if ns.workload == "top":
        print(top(ns.file, ns.rows))
        return 0
    configure_logging(level="WARNING")
    with nats_server() as server:
        if ns.workload == "consume":
            asyncio.run(consume(server.url, ns.seconds))
        elif ns.workload == "call":
            asyncio.run(call(server.url, ns.seconds))
        elif ns.workload == "call-raw":
            asyncio.run(call(server.url, ns.seconds, "serve-raw"))
        else:
            asyncio.run(relay(server.url, ns.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Service", "main", "top"]
