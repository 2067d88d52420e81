"""A job cancelled while its worker holds it (prefetched, waiting for a slot) never runs.

The worker learns of such a cancel from the core NATS cancel notice alone. Under load the
notice can still be unread (behind other traffic on the worker's connection, or not yet
written to its socket) when a slot frees; the worker must not start the held job before
it has read everything the server sent it until then. The worker runs in a process of its
own so the test can stall it (SIGSTOP, what a starved or paused process does) while the
cancel completes and megabytes of other traffic queue up ahead of the notice: when it
resumes, the slot frees at once and the notice is the last thing it reads.

Run as a script, this file is that worker:

    python tests/test_jobs_cancel.py --url nats://... --dir DIR --max-concurrency N
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from faultkit import paused, terminate

from framework import JobCancelled, JobContext, Service, connect
from framework.jobs.backend import Backend
from framework.jobs.barrier import ReadBarrier
from framework.jobs.options import JOBS_STREAM, Kind
from framework.jobs.process import Processor
from framework.testing import eventually
from framework.transport import wire

KIND = Kind("reports", "slots")
TRAFFIC_SUBJECT = "other.traffic"
TRAFFIC_MESSAGES = 12  # of about max_payload each, queued ahead of the cancel notices
RELEASE = "release"  # the file whose presence ends the blocking jobs
STARTED = "started.log"  # one line per handler run: the job id


def worker(directory: Path, max_concurrency: int) -> Service:
    """A `reports.slots` worker: jobs named `block-*` run until the release file exists;
    every run is logged first thing (one `os.write`, so a run is never lost)."""
    service = Service(KIND.service)
    log = os.open(directory / STARTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @service.job(KIND.name, max_concurrency=max_concurrency)
    async def slots(job: JobContext) -> None:
        os.write(log, f"{job.job_id}\n".encode())
        while job.job_id.startswith("block-") and not (directory / RELEASE).exists():
            await anyio.sleep(0.01)  # a timer: it fires on resume, before any socket read

    return service


async def serve_worker(url: str, directory: Path, max_concurrency: int) -> None:
    """Serve until SIGTERM; the connection also carries a subscription of other traffic."""
    received = 0

    async def other_traffic(msg: Any) -> None:
        nonlocal received
        received += 1
        (directory / "traffic").write_text(str(received))

    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with connect(url) as client, worker(directory, max_concurrency).serve(client):
            await client.nc.subscribe(TRAFFIC_SUBJECT, cb=other_traffic)
            await client.nc.flush()
            (directory / "ready").touch()
            async for _ in signals:
                return


class WorkerProcess:
    """This file run as the worker, in a process the test can pause."""

    def __init__(self, url: str, directory: Path, max_concurrency: int) -> None:
        self.directory = directory
        self.log = directory / "worker.log"
        options = ["--url", url, "--dir", str(directory), "--max-concurrency", str(max_concurrency)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def started(self) -> list[str]:
        path = self.directory / STARTED
        return path.read_text().split() if path.exists() else []

    def traffic(self) -> int:
        path = self.directory / "traffic"
        return int(path.read_text() or 0) if path.exists() else 0

    def report(self) -> str:
        return f"started {self.started()}; worker log:\n{self.log.read_text()[-3000:]}"

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        terminate(self.proc)


def pending_count(client: Any, count: int) -> Callable[[], Awaitable[bool]]:
    """Whether the kind's normal queue has `count` messages delivered and not acked."""

    async def check() -> bool:
        info = await client.js.consumer_info(JOBS_STREAM, KIND.consumer("normal"))
        return bool(info.num_ack_pending == count)

    return check


async def test_held_jobs_cancelled_while_their_worker_stalls_never_run(client, nats_url, tmp_path):
    slots = 4
    process = WorkerProcess(nats_url, tmp_path, slots)

    try:
        await eventually(lambda: (tmp_path / "ready").exists(), 30, process.report)
        blocking = [await client.enqueue(str(KIND), job_id=f"block-{i}") for i in range(slots)]
        await eventually(lambda: len(process.started()) == slots, 10, process.report)
        held = [await client.enqueue(str(KIND), job_id=f"held-{i}") for i in range(2)]
        await eventually(pending_count(client, slots + 2), what="the worker to hold both")
        chunk = bytes(client.nc.max_payload - 1024)
        with paused(process.proc.pid):
            for _ in range(TRAFFIC_MESSAGES):  # read by the worker before the notices
                await client.nc.publish(TRAFFIC_SUBJECT, chunk)
            for handle in held:  # returns once the server has routed the notice
                assert await handle.cancel() is True
            (tmp_path / RELEASE).touch()  # the slots free as soon as the worker runs
        for handle in blocking:
            await handle.result(timeout=30)
        await eventually(lambda: process.traffic() == TRAFFIC_MESSAGES, 30, process.report)
        await eventually(pending_count(client, 0), what="the held messages to be acked")
        assert sorted(process.started()) == [f"block-{i}" for i in range(slots)]
        for handle in held:
            with pytest.raises(JobCancelled):
                await handle.result(timeout=1)
        await held[0].retry()  # a retry runs, the cancel notice notwithstanding
        await held[0].result(timeout=10)
        assert process.started()[-1] == "held-0"
    finally:
        process.stop()


async def test_a_held_job_whose_worker_reconnected_meanwhile_asks_its_record(
    client, nats_server, tmp_path
):
    """The cancel notice is sent while the holding worker is cut off (its server
    restarted while the process was paused): lost with the old connection. After the
    worker reconnects, a PING on the new one proves nothing about the notice, so the
    held job starts only if its record says so."""
    process = WorkerProcess(nats_server.url, tmp_path, 1)

    async def worker_answers() -> bool:
        try:
            await client.nc.request(f"$SRV.PING.{KIND.service}", b"", timeout=0.5)
        except Exception:
            return False
        return True

    try:
        await eventually(lambda: (tmp_path / "ready").exists(), 30, process.report)
        blocking = await client.enqueue(str(KIND), job_id="block-0")
        await eventually(lambda: process.started() == ["block-0"], 10, process.report)
        held = await client.enqueue(str(KIND), job_id="held-0")
        await eventually(pending_count(client, 2), what="the worker to hold the second job")
        with paused(process.proc.pid):
            await anyio.to_thread.run_sync(nats_server.restart)
            await eventually(lambda: client.nc.is_connected, 10, "the test client to reconnect")
            assert await held.cancel() is True  # the worker's connection is gone: unheard
        await eventually(worker_answers, 30, "the worker to reconnect")
        (tmp_path / RELEASE).touch()
        await blocking.result(timeout=30)
        await eventually(pending_count(client, 0), what="the held message to be acked")
        assert process.started() == ["block-0"], process.report()
        with pytest.raises(JobCancelled):
            await held.result(timeout=1)
    finally:
        process.stop()


async def test_a_read_barrier_returns_once_everything_sent_before_it_is_read(client, nats_url):
    received = 0

    def count(msg: Any) -> None:
        nonlocal received
        received += 1

    async with connect(nats_url) as reader:
        await wire.subscribe_inline(reader.nc, TRAFFIC_SUBJECT, count)
        await reader.nc.flush()
        barrier = ReadBarrier(reader.nc)
        chunk = bytes(client.nc.max_payload - 1024)
        seen: list[tuple[bool, int]] = []

        async def traffic() -> None:
            for _ in range(TRAFFIC_MESSAGES):
                await client.nc.publish(TRAFFIC_SUBJECT, chunk)
            await client.nc.flush()  # routed to the reader, as a cancel notice by cancel()

        async def wait() -> None:
            seen.append((await barrier.wait(barrier.mark()), received))

        await traffic()
        async with anyio.create_task_group() as tg:
            for _ in range(16):  # jobs starting in the same moment: one PING for all
                tg.start_soon(wait)
        assert seen == [(True, TRAFFIC_MESSAGES)] * 16
        assert barrier.rounds == 1
        await traffic()
        seen.clear()
        async with anyio.create_task_group() as tg:
            for _ in range(9):  # one moment after another, while the first PONG is behind
                tg.start_soon(wait)  # the traffic: the other 8 share the next PING
                await anyio.lowlevel.checkpoint()
        assert seen == [(True, 2 * TRAFFIC_MESSAGES)] * 9
        assert barrier.rounds == 3
    assert await barrier.wait(0) is False  # closed: cannot know what was sent


async def test_a_held_job_is_checked_against_its_record_when_the_barrier_fails(client, nats_url):
    service = Service(KIND.service)
    ran: list[str] = []

    @service.job(KIND.name)
    async def slots(job: JobContext) -> None:
        ran.append(job.job_id)

    job_worker = service.jobs[0]
    await job_worker.prepare(client)  # its consumers, no worker pulling from them
    handle = await client.enqueue(str(KIND), job_id="x")
    pull = await client.js.pull_subscribe_bind(KIND.consumer("normal"), JOBS_STREAM)
    [msg] = await pull.fetch(1, timeout=5)  # held by this "worker"
    assert await handle.cancel() is True  # its notice is heard by no one here
    async with connect(nats_url) as lost:
        pass
    processor = Processor(
        client,
        (await Backend.of(client)).store,
        KIND,
        job_worker.fn,
        job_worker.signature,
        job_worker.options,
        worker_id="w-1",
        stats=job_worker.stats,
        counts=job_worker.counts,
        limiter=None,
        barrier=ReadBarrier(lost.nc),  # a connection that cannot answer a PING
    )
    assert await processor.process(msg, held_since=0) is False
    assert ran == [] and job_worker.counts.skipped == 1  # the record said cancelled


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the worker of tests/test_jobs_cancel.py")
    parser.add_argument("--url", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--max-concurrency", type=int, default=1)
    args = parser.parse_args()
    anyio.run(serve_worker, args.url, args.dir, args.max_concurrency)
