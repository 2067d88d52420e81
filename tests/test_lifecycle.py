"""Graceful shutdown, reconnect after a server restart, and `Service.run` under signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from framework import BatchPublisher, DeadlineExceeded, NoResponders, Service, connect
from framework.dev.devserver import NatsServer
from framework.testing import eventually


class Job(msgspec.Struct):
    n: int


async def test_in_flight_request_completes_during_graceful_shutdown(nats_url):
    svc = Service("slowpoke")
    entered = anyio.Event()

    @svc.rpc()
    async def work(n: int) -> int:
        entered.set()
        await anyio.sleep(0.5)
        return n + 1

    result: list[int] = []
    async with connect(nats_url) as client:
        async with anyio.create_task_group() as tg:
            async with svc.serve(nats_url, grace=5):

                async def call() -> None:
                    result.append(await client.call("slowpoke.work", 41, returns=int, timeout=5))

                tg.start_soon(call)
                await entered.wait()
            # serve() has exited: the service stopped while the request was in flight
        assert result == [42]
        with pytest.raises(NoResponders):
            await client.call("slowpoke.work", 1, timeout=1)


async def test_grace_period_bounds_shutdown(nats_url):
    svc = Service("stuck")
    entered = anyio.Event()

    @svc.rpc()
    async def hang() -> None:
        entered.set()
        await anyio.sleep(60)

    async with connect(nats_url) as client:
        async with anyio.create_task_group() as tg:
            started = time.monotonic()
            async with svc.serve(nats_url, grace=0.3):

                async def call() -> None:
                    with pytest.raises(DeadlineExceeded):
                        await client.call("stuck.hang", timeout=3)

                tg.start_soon(call)
                await entered.wait()
            assert time.monotonic() - started < 3


async def test_service_serves_again_after_server_restart(nats_server: NatsServer, serve):
    svc = Service("phoenix")

    @svc.rpc()
    async def echo(text: str) -> str:
        return text

    await serve(svc)
    async with connect(nats_server.url) as client:
        assert await client.call("phoenix.echo", "before", returns=str) == "before"
        nats_server.restart()

        async def answers_again() -> bool:
            try:
                return await client.call("phoenix.echo", "after", returns=str, timeout=1) == "after"
            except (NoResponders, DeadlineExceeded, Exception):  # reconnecting, re-subscribing
                return False

        await eventually(answers_again, 15, "an answer after the restart", 0.2)


SERVICE_MODULE = textwrap.dedent(
    """
    import anyio
    from framework import Service

    svc = Service("sig")

    @svc.rpc()
    async def slow(n: int) -> int:
        await anyio.sleep(1.0)
        return n * 2

    if __name__ == "__main__":
        svc.run()
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_stops_gracefully_on_signal(tmp_path: Path, nats_url, signum):
    (tmp_path / "sigsvc.py").write_text(SERVICE_MODULE)
    env = {**os.environ, "NATS_URL": nats_url, "PYTHONPATH": str(tmp_path), "LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "sigsvc.py")], env=env, stderr=subprocess.PIPE
    )
    try:
        async with connect(nats_url) as client:
            await eventually(lambda: client.ping("sig", timeout=0.2), 15, "sig started", 0.1)
            async with anyio.create_task_group() as tg:
                answers: list[int] = []

                async def call() -> None:
                    answers.append(await client.call("sig.slow", 21, returns=int, timeout=5))

                tg.start_soon(call)
                await anyio.sleep(0.3)
                proc.send_signal(signum)
            assert answers == [42]
        assert proc.wait(timeout=10) == 0
        assert b"service stopped" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("idempotent", [True, False])
async def test_a_replica_stopping_mid_stream_leaves_nothing_stuck(nats_url, idempotent):
    """What a stopping replica pulled is finished (or handed back), the next replica
    takes the rest at once (nothing waits out ack_wait), and no event runs twice."""
    handled: list[tuple[str, int]] = []
    started = anyio.Event()

    def replica(name: str, delay: float) -> Service:
        svc = Service("jobs")

        @svc.subscribe("work.job.queued.v1", max_concurrency=2, idempotent=idempotent)
        async def run_job(job: Job) -> None:
            started.set()
            await anyio.sleep(delay)
            handled.append((name, job.n))

        return svc

    first = replica("first", 0.5)
    async with connect(nats_url) as client:
        async with first.serve(nats_url, grace=5):
            async with BatchPublisher(client) as batch:
                for n in range(6):
                    await batch.publish("work.job.queued.v1", Job(n))
            with anyio.fail_after(5):
                await started.wait()
        # `first` stopped: what it had pulled finished within the grace period
        began = time.monotonic()
        async with replica("second", 0.0).serve(nats_url):
            # ack_wait is 30 s: well before it
            await eventually(lambda: len(handled) >= 6, 10, "all six handled")
        assert time.monotonic() - began < 10
    assert sorted(n for _, n in handled) == list(range(6))  # each exactly once
    assert any(name == "first" for name, _ in handled)


async def test_events_still_being_looked_up_at_stop_are_handed_back(nats_url):
    """A replica stops while a pulled batch waits for its idempotency lookup: the batch
    is nak'd for the next replica, not left to wait out ack_wait."""
    handled: list[tuple[str, int]] = []

    def replica(name: str) -> Service:
        svc = Service("lookups")

        @svc.subscribe("work.job.queued.v1", max_concurrency=4)
        async def run_job(job: Job) -> None:
            handled.append((name, job.n))

        return svc

    first = replica("first")
    lookup_started, release = anyio.Event(), anyio.Event()
    stop_began = 0.0

    async def answer_late() -> None:
        await anyio.sleep(0.3)  # the stop has begun by now
        assert stop_began, "the lookup was answered before the stop"
        release.set()

    async with connect(nats_url) as client, anyio.create_task_group() as tg:
        async with first.serve(nats_url, grace=2):
            processed = first.subscribers[0]._processed
            assert processed is not None
            real_seen_among = processed.seen_among

            async def slow_seen_among(ids):  # the server is slow to answer this one
                lookup_started.set()
                await release.wait()
                return await real_seen_among(ids)

            processed.seen_among = slow_seen_among  # type: ignore[method-assign]
            async with BatchPublisher(client) as batch:
                for n in range(4):
                    await batch.publish("work.job.queued.v1", Job(n))
            with anyio.fail_after(5):
                await lookup_started.wait()
            tg.start_soon(answer_late)
            stop_began = time.monotonic()  # leaving `serve` stops `first` now
        assert handled == []  # stopped with the batch unhandled
        async with replica("second").serve(nats_url):
            # ack_wait is 30 s: handed back, not waited out
            await eventually(lambda: len(handled) >= 4, 10, "all four handled")
    assert sorted(handled) == [("second", n) for n in range(4)]
