"""Jobs across replicas and processes: exactly once, priorities, rate limits, crashes,
and one trace from enqueue to handler.

This file is also the worker process the crash test SIGKILLs:

    python tests/test_jobs_scale.py --url nats://... --ledger FILE
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from framework import JobContext, Service
from framework.testing import eventually


class Item(msgspec.Struct):
    n: int


def counting_service(ledger: Counter[str], **options: Any) -> Service:
    service = Service("work")

    @service.job("item", **options)
    async def item(req: Item, job: JobContext) -> int:
        ledger[job.job_id] += 1
        return req.n

    return service


async def test_a_thousand_jobs_over_two_replicas_succeed_exactly_once(serve, client):
    first: Counter[str] = Counter()
    second: Counter[str] = Counter()
    await serve(counting_service(first, max_concurrency=32))
    await serve(counting_service(second, max_concurrency=32))
    handles = [await client.enqueue("work.item", Item(n), job_id=f"item-{n}") for n in range(1000)]
    await eventually(
        lambda: sum(first.values()) + sum(second.values()) >= 1000,
        timeout=60,
        what=lambda: f"{sum(first.values())} + {sum(second.values())} of 1000 jobs",
    )
    await anyio.sleep(0.5)  # anything run twice would show up now
    both = first + second
    assert len(both) == 1000 and set(both.values()) == {1}
    assert first and second, "both replicas took jobs"
    states = Counter([(await handle.status()).state for handle in handles[::50]])
    assert states == Counter({"succeeded": 20})
    stats = await client.stats("work")
    assert sum((s.endpoints[0].data or {})["succeeded"] for s in stats) == 1000


async def test_high_priority_jobs_start_before_a_backlog_of_low_ones(serve, client):
    order: list[str] = []
    service = Service("work")

    @service.job("ordered", max_concurrency=1)
    async def ordered(job: JobContext) -> None:
        order.append(job.job_id)

    for n in range(500):
        await client.enqueue("work.ordered", job_id=f"low-{n}", priority="low")
    for n in range(10):
        await client.enqueue("work.ordered", job_id=f"normal-{n}")
    for n in range(20):
        await client.enqueue("work.ordered", job_id=f"high-{n}", priority="high")
    await serve(service)
    await eventually(lambda: len(order) >= 40, timeout=30, what="40 jobs started")
    assert order[:20] == [f"high-{n}" for n in range(20)]
    assert order[20:30] == [f"normal-{n}" for n in range(10)]
    assert all(job.startswith("low-") for job in order[30:])


async def test_high_priority_jobs_overtake_a_running_backlog(serve, client):
    order: list[str] = []
    service = Service("work")

    @service.job("busy", max_concurrency=2)
    async def busy(job: JobContext) -> None:
        order.append(job.job_id)
        await anyio.sleep(0.02)

    await serve(service)
    for n in range(500):
        await client.enqueue("work.busy", job_id=f"low-{n}", priority="low")
    for n in range(10):
        await client.enqueue("work.busy", job_id=f"high-{n}", priority="high")
    await eventually(lambda: all(f"high-{n}" in order for n in range(10)), timeout=30)
    first_high = order.index("high-0")
    highs = order[first_high : first_high + 10]
    # once the first high job starts, the others follow before any more low job, except
    # the few low jobs the worker already held (max_concurrency + its prefetch)
    lows_between = [job for job in highs if job.startswith("low-")]
    assert len(lows_between) <= 2, order[first_high - 3 : first_high + 14]
    assert sum(1 for job in order if job.startswith("low-")) < 200  # the backlog waited


async def _pull_requests(client: Any, kind: str) -> list[dict[str, Any]]:
    """Every pull request sent to a kind's consumers from now on (bodies, decoded)."""
    seen: list[dict[str, Any]] = []

    service, name = kind.split(".")
    consumers = f"$JS.API.CONSUMER.MSG.NEXT.JOBS.job_{service}_{name}_"

    async def record(msg: Any) -> None:
        if msg.subject.startswith(consumers):
            seen.append(msgspec.json.decode(msg.data))

    await client.nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.JOBS.*", cb=record)
    await client.nc.flush()
    return seen


async def test_an_idle_worker_keeps_waiting_on_its_queues_across_jobs(serve, client):
    """A job that leaves its queue empty does not make the worker sweep every queue
    again (a `no_wait` pull each, then new long pulls): the long pull that brought it
    is renewed, so the next job finds a pull waiting for it."""
    service, done = Service("work"), Counter[str]()

    @service.job("quick")
    async def quick(job: JobContext) -> None:
        done[job.job_id] += 1

    await serve(service)
    await (await client.enqueue("work.quick", job_id="warm-up")).result(timeout=10)
    requests = await _pull_requests(client, "work.quick")
    for n in range(10):
        await (await client.enqueue("work.quick", job_id=f"q-{n}")).result(timeout=10)
    await eventually(lambda: len(requests) >= 10, what=lambda: f"{len(requests)} pull requests")
    assert not [r for r in requests if r.get("no_wait")], requests
    assert all(r["batch"] == 1 and r["expires"] > 0 for r in requests)
    assert done == Counter([f"q-{n}" for n in range(10)] + ["warm-up"])


async def test_an_expired_long_pull_is_renewed_without_a_sweep(serve, client, monkeypatch):
    from framework.jobs import puller

    monkeypatch.setattr(puller, "LONG_POLL", 0.3)  # pulls of an idle worker expire often
    service, done = Service("work"), Counter[str]()

    @service.job("quiet")
    async def quiet(job: JobContext) -> None:
        done[job.job_id] += 1

    await serve(service)

    async def waiting_on_each_queue() -> bool:
        for priority in ("high", "normal", "low"):
            info = await client.js.consumer_info("JOBS", f"job_work_quiet_{priority}")
            if not info.num_waiting:
                return False
        return True

    await eventually(waiting_on_each_queue, what="a long pull on each queue (after a sweep)")
    requests = await _pull_requests(client, "work.quiet")
    await eventually(lambda: len(requests) >= 9, what="three rounds of expired pulls renewed")
    assert not [r for r in requests if r.get("no_wait")], requests
    assert await (await client.enqueue("work.quiet", job_id="then")).result(timeout=10) is None
    assert done == Counter(["then"])


async def test_a_rate_limit_holds_across_two_replicas(serve, client):
    starts: list[float] = []
    services = []
    for _ in range(2):
        service = Service("work")

        @service.job("limited", rate_limit="5/s", max_concurrency=8)
        async def limited(job: JobContext) -> None:
            starts.append(time.time())

        services.append(service)
    for service in services:
        await serve(service)
    for n in range(50):
        await client.enqueue("work.limited", job_id=f"l-{n}")
    await eventually(lambda: len(starts) == 50, timeout=30, what=lambda: f"{len(starts)}/50")
    elapsed = max(starts) - min(starts)
    assert elapsed >= 9.0, f"50 jobs at 5/s started within {elapsed:.2f}s"
    starts.sort()
    busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert busiest <= 6, f"{busiest} starts within one second"


# -- a worker killed mid-job ------------------------------------------------------------


def crash_worker(ledger: Path) -> Service:
    """The service the crash test runs in a subprocess (and in the test itself)."""
    service = Service("work")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT

    @service.job("crashy", ack_wait=2.0, max_attempts=3)
    async def crashy(req: Item, job: JobContext) -> str:
        fd = os.open(ledger, flags, 0o644)
        os.write(fd, f"start {job.job_id} {job.attempt} {os.getpid()}\n".encode())
        await anyio.sleep(req.n)
        os.write(fd, f"done {job.job_id} {job.attempt} {os.getpid()}\n".encode())
        os.close(fd)
        return f"done by {os.getpid()}"

    return service


async def test_a_killed_workers_job_is_finished_by_another_with_attempt_2(
    serve, client, nats_url, tmp_path
):
    ledger = tmp_path / "ledger.log"
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--url", nats_url, "--ledger", str(ledger)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await eventually(lambda: _served(client), timeout=20, what="the worker process")
        handle = await client.enqueue("work.crashy", Item(3), job_id="c-1")
        await eventually(lambda: ledger.exists() and "start c-1 1" in ledger.read_text())
        await eventually(lambda: _state_is(handle, "running"), what="running recorded")
        assert (await handle.status()).attempt == 1
        await serve(crash_worker(ledger))  # the other worker, in this process
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        result = await handle.result(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert result == f"done by {os.getpid()}"
    assert time.monotonic() - killed_at >= 2.0  # ack_wait, not at once
    status = await handle.status()
    assert (status.state, status.attempt) == ("succeeded", 2)
    lines = ledger.read_text().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        "start c-1 1",
        "start c-1 2",
        "done c-1 2",
    ]
    [stats] = await client.stats("work")  # only this process answers now
    assert (stats.endpoints[0].data or {})["succeeded"] == 1


async def _state_is(handle: Any, state: str) -> bool:
    return (await handle.status()).state == state


async def _served(client: Any) -> bool:
    return bool(await client.ping("work"))


# -- one trace from enqueue to the handler ------------------------------------------------


@pytest.fixture
def spans() -> Any:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def test_trace_context_and_correlation_flow_from_enqueue_into_the_handler(
    serve, client, spans
):
    service = Service("work")
    inside: list[tuple[str, str, str]] = []

    @service.job("traced")
    async def traced(job: JobContext) -> None:
        ids = job.span.get_span_context()
        inside.append((format(ids.trace_id, "032x"), job.correlation_id, job.job_id))

    await serve(service)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("checkout") as root:
        handle = await client.enqueue("work.traced", job_id="t-1", correlation_id="order-7")
    await handle.result(timeout=10)
    trace_id = format(root.get_span_context().trace_id, "032x")
    assert inside == [(trace_id, "order-7", "t-1")]
    assert (await handle.status()).trace_id == trace_id
    finished = {s.name: s for s in spans.get_finished_spans()}
    producer = finished["publish jobs.work.traced.normal"]
    consumer = finished["process jobs.work.traced"]
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert consumer.kind == trace.SpanKind.CONSUMER and producer.kind == trace.SpanKind.PRODUCER
    assert consumer.context.trace_id == root.get_span_context().trace_id


# -- the worker process ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ledger", required=True)
    args = parser.parse_args()
    crash_worker(Path(args.ledger)).run(args.url)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
