"""Background jobs against a real JetStream server: lifecycle, status, failures, schedules."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from framework import (
    BadRequest,
    Context,
    JobCancelled,
    JobContext,
    JobFailed,
    JobStatus,
    NotFound,
    Reject,
    Service,
    ServiceError,
)
from framework.events.deadletter import list_dead_letters, replay_dead_letter
from framework.jobs.schedule import list_schedules
from framework.testing import eventually


class Render(msgspec.Struct):
    pages: int


class Rendered(msgspec.Struct):
    url: str
    pages: int


def reports(**options: Any) -> tuple[Service, list[tuple[str, int]]]:
    """A `reports` service with a `render` job; the list records (job id, attempt)."""
    service = Service("reports", version="1.0.0")
    runs: list[tuple[str, int]] = []

    @service.job("render", **options)
    async def render(req: Render, job: JobContext) -> Rendered:
        runs.append((job.job_id, job.attempt))
        for page in range(req.pages):
            await job.progress((page + 1) / req.pages, f"page {page + 1} of {req.pages}")
        return Rendered(url=f"/reports/{job.job_id}.pdf", pages=req.pages)

    return service, runs


async def test_a_job_runs_and_its_typed_result_comes_back(serve, client):
    service, runs = reports()
    await serve(service)
    handle = await client.enqueue("reports.render", Render(3), job_id="r-1", returns=Rendered)
    assert (handle.kind, handle.id) == ("reports.render", "r-1")
    assert await handle.result(timeout=10) == Rendered("/reports/r-1.pdf", 3)
    status = await handle.status()
    assert (status.state, status.attempt, status.max_attempts, status.progress) == (
        "succeeded",
        1,
        3,
        1.0,
    )
    assert status.worker == service.instance_id
    assert status.enqueued_at and status.started_at and status.finished_at
    assert status.enqueued_at <= status.started_at <= status.finished_at
    assert status.result == {"url": "/reports/r-1.pdf", "pages": 3}
    assert runs == [("r-1", 1)]
    same = client.job("reports.render", "r-1", returns=Rendered)
    assert await same.result(timeout=1) == Rendered("/reports/r-1.pdf", 3)


async def test_watch_follows_every_change_through_a_key_watch(serve, client):
    service = Service("reports")
    gate = anyio.Event()

    @service.job("slow")
    async def slow(req: Render, job: JobContext) -> int:
        await job.progress(0.5, "half way")
        await gate.wait()
        return req.pages

    await serve(service)
    handle = await client.enqueue("reports.slow", Render(7))
    seen: list[JobStatus] = []
    mux = await client.mux()

    async def follow() -> None:
        async for status in handle.watch():
            seen.append(status)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await eventually(lambda: any(s.progress == 0.5 for s in seen), what="progress 0.5")
        requests = mux.requests
        await anyio.sleep(1.0)  # the watch waits: no request of ours meanwhile (no polling)
        assert mux.requests == requests
        kv = await client.js.stream_info("KV_jobs")
        assert kv.state.consumer_count >= 1  # the watch is a consumer of the bucket
        gate.set()
    states = [s.state for s in seen]
    assert states[-1] == "succeeded" and "running" in states
    assert seen[-1].result == 7
    assert next(s.message for s in seen if s.progress == 0.5) == "half way"


async def test_progress_is_coalesced(serve, client):
    service = Service("reports")

    @service.job("chatty")
    async def chatty(job: JobContext) -> None:
        started = time.monotonic()
        reports = 0
        while time.monotonic() - started < 1.0:
            for _ in range(100):
                reports += 1
                await job.progress(min(1.0, reports / 20000), f"report {reports}")
            await anyio.lowlevel.checkpoint()
        assert reports >= 10_000

    await serve(service)
    before = (await client.js.stream_info("KV_jobs")).state.last_seq
    handle = await client.enqueue("reports.chatty")
    await handle.result(timeout=20)
    writes = (await client.js.stream_info("KV_jobs")).state.last_seq - before
    # create + one write per 0.2 s for about a second (progress, running) + succeeded
    assert writes <= 12, f"{writes} writes for >= 10,000 progress reports"
    assert writes >= 3  # create, progress while the job ran, outcome


async def test_a_known_kind_refuses_a_bad_payload_at_enqueue(serve, client):
    service, runs = reports()
    await serve(service)
    with pytest.raises(BadRequest, match=r"data\.pages must be integer"):
        await client.enqueue("reports.render", {"pages": "many"})
    with pytest.raises(BadRequest, match=r"pages"):
        await client.enqueue("reports.render", {})
    assert runs == []


async def test_an_unknown_kind_takes_any_payload_and_dead_letters_what_cannot_run(serve, client):
    handle = await client.enqueue("reports.render", {"pages": "many"}, job_id="bad-1")
    assert (await handle.status()).state == "queued"
    service, runs = reports()
    await serve(service)
    with pytest.raises(JobFailed, match="bad-1 failed after 1 attempt") as failed:
        await handle.result(timeout=10)
    assert failed.value.status.state == "failed"
    letters = await list_dead_letters(client, service="reports")
    assert [(d.reason, d.event_id, d.subject) for d in letters] == [
        ("undecodable", "bad-1", "jobs.reports.render.normal.bad-1")
    ]
    assert runs == []


async def test_a_duplicate_job_id_returns_the_first_job(serve, client):
    first = await client.enqueue("reports.render", Render(1), job_id="once")
    again = await client.enqueue("reports.render", Render(2), job_id="once")
    assert again.id == first.id
    assert (await again.status()).payload == {"pages": 1}  # the first job's
    service, runs = reports()
    await serve(service)
    await first.result(timeout=10)
    await anyio.sleep(0.5)
    assert runs == [("once", 1)]
    assert (await client.js.stream_info("JOBS")).state.messages == 0


async def test_concurrent_enqueues_of_one_id_make_one_job(serve, client):
    handles: list[Any] = []

    async def enqueue(n: int) -> None:
        handles.append(await client.enqueue("reports.render", Render(n), job_id="race"))

    async with anyio.create_task_group() as tg:
        for n in range(1, 11):
            tg.start_soon(enqueue, n)
    assert {h.id for h in handles} == {"race"}
    assert (await client.js.stream_info("JOBS")).state.messages == 1
    service, runs = reports()
    await serve(service)
    await handles[0].result(timeout=10)
    await anyio.sleep(0.5)
    assert runs == [("race", 1)]


async def test_a_finished_job_id_can_run_again(serve, client):
    service, runs = reports()
    await serve(service)
    await (await client.enqueue("reports.render", Render(1), job_id="daily")).result(timeout=10)
    second = await client.enqueue("reports.render", Render(2), job_id="daily", returns=Rendered)
    assert (await second.result(timeout=10)).pages == 2
    assert runs == [("daily", 1), ("daily", 1)]


async def test_a_delayed_job_starts_after_its_delay(serve, client):
    service, _ = reports()
    await serve(service)
    enqueued = datetime.now(UTC)
    handle = await client.enqueue("reports.render", Render(1), delay=2)
    status = await handle.status()
    assert status.state == "scheduled" and status.run_at is not None
    await handle.result(timeout=10)
    started = (await handle.status()).started_at
    assert started is not None
    waited = (started - enqueued).total_seconds()
    assert 2.0 <= waited < 3.0, f"started {waited:.2f}s after enqueue"


async def test_a_job_at_a_time_and_cancelling_it_before_then(serve, client):
    service, runs = reports()
    await serve(service)
    at = datetime.now(UTC) + timedelta(seconds=1.5)
    later = await client.enqueue("reports.render", Render(1), at=at, job_id="at-1")
    cancelled = await client.enqueue("reports.render", Render(1), delay=1, job_id="at-2")
    assert await cancelled.cancel() is True
    await later.result(timeout=10)
    started = (await later.status()).started_at
    assert started is not None and started >= at
    await anyio.sleep(1.0)
    assert runs == [("at-1", 1)]
    assert (await cancelled.status()).state == "cancelled"
    with pytest.raises(JobCancelled):
        await cancelled.result(timeout=1)
    subjects = (await client.js.stream_info("JOBS", subjects_filter=">")).state.subjects
    assert not subjects  # the cancelled job's schedule is gone, not waiting to fire


async def test_bad_delays_are_refused(client):
    with pytest.raises(BadRequest):
        await client.enqueue("reports.render", Render(1), delay=1, at=datetime.now(UTC))
    with pytest.raises(BadRequest):
        await client.enqueue("reports.render", Render(1), at=datetime.now())
    with pytest.raises(BadRequest):
        await client.enqueue("reports.render", Render(1), priority="urgent")


async def test_an_every_second_schedule_fires_until_unscheduled(serve, client):
    service = Service("reports")
    fired: list[float] = []

    @service.job("tick")
    async def tick(req: Render, job: JobContext) -> None:
        fired.append(time.monotonic())
        assert job.job_id.startswith("ticker-")

    await serve(service)
    name = await client.schedule("reports.tick", Render(1), every=1, name="ticker")
    assert name == "ticker"
    [listed] = await list_schedules(client, "reports.tick")
    assert (listed.name, listed.spec, listed.payload) == ("ticker", "@every 1s", {"pages": 1})
    started = time.monotonic()
    await anyio.sleep(4.2)
    assert await client.unschedule("reports.tick", "ticker") is True
    count = len(fired)
    assert 3 <= count <= 5, f"{count} firings in 4.2 s"
    gaps = [b - a for a, b in itertools.pairwise(fired)]
    assert all(0.6 < gap < 1.5 for gap in gaps), gaps
    assert fired[0] - started < 2.0
    await anyio.sleep(2.0)
    assert len(fired) == count  # nothing after unschedule
    assert await client.unschedule("reports.tick", "ticker") is False
    assert await list_schedules(client, "reports.tick") == []


async def test_a_schedule_declared_in_code_runs_and_is_listed(serve, client):
    service = Service("reports")
    fired: list[str] = []

    @service.job("cleanup", schedule="@every 1s")
    async def cleanup(job: JobContext) -> None:
        fired.append(job.job_id)

    await serve(service)
    await eventually(lambda: len(fired) >= 2, timeout=5, what="two firings")
    [listed] = await list_schedules(client)
    assert (listed.kind, listed.name, listed.spec) == ("reports.cleanup", "_code", "@every 1s")
    status = await client.job("reports.cleanup", fired[0]).status()
    assert status.schedule == "_code" and status.state == "succeeded"


async def test_bad_schedules_are_refused(client):
    with pytest.raises(BadRequest):
        await client.schedule("reports.tick", cron="every day")
    with pytest.raises(BadRequest, match="refused"):
        await client.schedule("reports.tick", cron="99 * * * * *")
    with pytest.raises(BadRequest):
        await client.schedule("reports.tick", every=0.5)
    with pytest.raises(ValueError):
        Service("x").job("y", schedule="sometimes")


async def test_a_failed_attempt_is_retried_visibly_then_succeeds(serve, client):
    service = Service("reports")
    attempts: list[int] = []

    @service.job("flaky", backoff=[0.3, 0.3], max_attempts=3)
    async def flaky(job: JobContext) -> str:
        attempts.append(job.attempt)
        if job.attempt < 3:
            raise RuntimeError(f"upstream down (attempt {job.attempt})")
        return "ok"

    await serve(service)
    handle = await client.enqueue("reports.flaky")
    seen: list[JobStatus] = [s async for s in handle.watch()]
    retrying = [s for s in seen if s.state == "retrying"]
    assert retrying and retrying[0].error == "RuntimeError: upstream down (attempt 1)"
    assert retrying[0].run_at is not None
    assert seen[-1].state == "succeeded" and seen[-1].attempt == 3
    assert attempts == [1, 2, 3]


async def test_exhausted_attempts_fail_dead_letter_and_replay_reruns(serve, client):
    service = Service("reports")
    broken = True

    @service.job("fragile", backoff=[0.1], max_attempts=2)
    async def fragile(req: Render, job: JobContext) -> int:
        if broken:
            raise ValueError("cannot render")
        return req.pages

    await serve(service)
    handle = await client.enqueue("reports.fragile", Render(4), job_id="f-1")
    with pytest.raises(JobFailed) as failed:
        await handle.result(timeout=10)
    assert failed.value.status.attempt == 2
    assert failed.value.status.error == "ValueError: cannot render"
    [letter] = await list_dead_letters(client, service="reports")
    assert (letter.reason, letter.attempts, letter.event_id) == ("max_attempts", 2, "f-1")
    broken = False
    await replay_dead_letter(client, letter.id)  # what `mesh dlq replay` does
    await eventually(
        lambda: _state(client, "reports.fragile", "f-1", "succeeded"), what="replayed success"
    )
    assert (await handle.status()).result == 4


async def _state(client: Any, kind: str, job_id: str, state: str) -> bool:
    return (await client.job(kind, job_id).status()).state == state


async def test_reject_fails_at_once(serve, client):
    service = Service("reports")
    calls: list[int] = []

    @service.job("strict", max_attempts=5)
    async def strict(req: Render) -> None:
        calls.append(req.pages)
        raise Reject("pages must be even")

    await serve(service)
    handle = await client.enqueue("reports.strict", Render(3))
    with pytest.raises(JobFailed, match="pages must be even"):
        await handle.result(timeout=10)
    assert calls == [3]
    [letter] = await list_dead_letters(client, service="reports")
    assert letter.reason == "rejected"


async def test_a_timeout_cancels_the_attempt(serve, client):
    service = Service("reports")
    finished: list[bool] = []

    @service.job("stuck", timeout=0.3, max_attempts=2, backoff=[0.1])
    async def stuck() -> None:
        await anyio.sleep(30)
        finished.append(True)

    await serve(service)
    handle = await client.enqueue("reports.stuck")
    started = time.monotonic()
    with pytest.raises(JobFailed, match=r"timed out after 0\.3s"):
        await handle.result(timeout=10)
    assert time.monotonic() - started < 5
    assert finished == []


async def test_cancelling_a_running_job_stops_its_handler_within_a_second(serve, client):
    service = Service("reports")
    running = anyio.Event()
    stopped: list[float] = []

    @service.job("long")
    async def long(job: JobContext) -> None:
        running.set()
        try:
            await anyio.sleep(60)
        finally:
            stopped.append(time.monotonic())

    await serve(service)
    handle = await client.enqueue("reports.long")
    with anyio.fail_after(10):
        await running.wait()
    asked = time.monotonic()
    assert await handle.cancel() is True
    await eventually(lambda: stopped, timeout=2, what="the handler to stop")
    assert stopped[0] - asked < 1.0
    status = await handle.status()
    assert status.state == "cancelled" and status.finished_at is not None
    with pytest.raises(JobCancelled):
        await handle.result(timeout=1)
    assert await handle.cancel() is False  # final already: a no-op that says so
    stats = (await client.stats("reports"))[0].endpoints[0].data
    assert stats is not None and stats["cancelled"] == 1


async def test_a_cancelled_queued_job_never_runs(serve, client):
    handle = await client.enqueue("reports.render", Render(1))
    assert await handle.cancel() is True
    service, runs = reports()
    await serve(service)
    await eventually(
        lambda: _jobs_left(client), what="the queue to be empty"
    )  # the worker took the message and skipped it
    assert runs == []
    assert (await handle.status()).state == "cancelled"


async def _jobs_left(client: Any) -> bool:
    return (await client.js.stream_info("JOBS")).state.messages == 0


async def test_unknown_jobs_are_not_found(client):
    missing = client.job("reports.render", "nope")
    with pytest.raises(NotFound):
        await missing.status()
    with pytest.raises(NotFound):
        await missing.result(timeout=1)
    with pytest.raises(NotFound):
        await missing.cancel()


async def test_a_result_wait_can_time_out(serve, client):
    handle = await client.enqueue("reports.render", Render(1))  # no worker runs
    with pytest.raises(ServiceError) as timeout:
        await handle.result(timeout=0.5)
    assert timeout.value.code == 408 and "queued" in timeout.value.message


async def test_retry_requeues_a_failed_job(serve, client):
    service = Service("reports")
    broken = True

    @service.job("once", max_attempts=1)
    async def once(req: Render) -> int:
        if broken:
            raise RuntimeError("boom")
        return req.pages * 2

    await serve(service)
    handle = await client.enqueue("reports.once", Render(5))
    with pytest.raises(JobFailed):
        await handle.result(timeout=10)
    broken = False
    await handle.retry()
    assert await handle.result(timeout=10) == 10
    with pytest.raises(ServiceError, match="only a failed or cancelled job"):
        await handle.retry()


async def test_jobs_are_listed_in_info_and_counted_in_stats(serve, client):
    service, _ = reports(max_concurrency=2, rate_limit="100/s", timeout=30)
    await serve(service)
    await (await client.enqueue("reports.render", Render(1))).result(timeout=10)
    [info] = await client.info("reports")
    [endpoint] = info.endpoints
    meta = endpoint.metadata or {}
    assert (endpoint.name, meta["kind"], meta["job_kind"]) == ("render", "job", "reports.render")
    assert msgspec.json.decode(meta["payload_schema"])["$defs"]["Render"]["required"] == ["pages"]
    assert "Rendered" in meta["result_schema"]
    assert (meta["rate_limit"], meta["timeout"], meta["max_concurrency"]) == ("100/1s", "30", "2")
    [stats] = await client.stats("reports")
    data = stats.endpoints[0].data or {}
    assert stats.endpoints[0].num_requests == 1
    assert (data["succeeded"], data["queued"], data["running"]) == (1, 0, 0)


async def test_a_handler_may_take_a_plain_context(serve, client):
    service = Service("reports")
    ids: list[str | None] = []

    @service.job("plain")
    async def plain(ctx: Context) -> None:
        ids.append(ctx.message_id)

    await serve(service)
    handle = await client.enqueue("reports.plain", job_id="p-1")
    await handle.result(timeout=10)
    assert ids == ["p-1"]


async def test_correlation_id_flows_from_enqueue_to_the_handler(serve, client):
    service = Service("reports")
    seen: list[tuple[str, str | None]] = []

    @service.job("traced")
    async def traced(job: JobContext) -> None:
        seen.append((job.correlation_id, job.causation_id))

    await serve(service)
    handle = await client.enqueue("reports.traced", correlation_id="order-42")
    await handle.result(timeout=10)
    assert seen == [("order-42", None)]
    assert (await handle.status()).correlation_id == "order-42"


async def test_many_kinds_and_priorities_do_not_mix_up(serve, client):
    service, runs = reports()
    other = Service("mail")
    sent: Counter[str] = Counter()

    @other.job("send")
    async def send(req: Render, job: JobContext) -> None:
        sent[job.job_id] += 1

    await serve(service)
    await serve(other)
    handles = [
        await client.enqueue("reports.render", Render(1), priority=p) for p in ("high", "low")
    ] + [await client.enqueue("mail.send", Render(1), job_id=f"m-{i}") for i in range(3)]
    for handle in handles:
        await handle.result(timeout=10)
    assert len(runs) == 2 and sent == Counter({"m-0": 1, "m-1": 1, "m-2": 1})


async def test_a_job_cancelled_while_its_worker_holds_it_never_runs(serve, client):
    service = Service("reports")
    started: list[str] = []
    gate = anyio.Event()

    @service.job("one_at_a_time", max_concurrency=1)
    async def one_at_a_time(job: JobContext) -> None:
        started.append(job.job_id)
        await gate.wait()

    await serve(service)
    first = await client.enqueue("reports.one_at_a_time", job_id="first")
    await eventually(lambda: started == ["first"], what="the first job to start")
    held = await client.enqueue("reports.one_at_a_time", job_id="held")
    await anyio.sleep(0.3)  # taken by the busy worker (its prefetch), waiting for a slot
    assert await held.cancel() is True
    gate.set()
    await first.result(timeout=10)
    await anyio.sleep(0.5)
    assert started == ["first"]
    with pytest.raises(JobCancelled):
        await held.result(timeout=1)
    await held.retry()  # a retry after the cancel runs, despite the cancel notice seen
    await held.result(timeout=10)
    assert started == ["first", "held"]


async def test_a_stopping_worker_hands_its_job_to_another_replica(serve, client, nats_url):
    started: list[tuple[str, int]] = []
    release = anyio.Event()

    def replica() -> Service:
        service = Service("reports")

        @service.job("long", ack_wait=30)
        async def long(job: JobContext) -> int:
            started.append((job.job_id, job.attempt))
            await release.wait()
            return job.attempt

        return service

    first = replica()
    stopped = anyio.Event()

    async def run_first() -> None:
        async with first.serve(nats_url, grace=0.2):
            await eventually(lambda: started, what="the job to start")
        stopped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_first)
        handle = await client.enqueue("reports.long", job_id="handed")
        await stopped.wait()
    await serve(replica())  # gets the job at once (nak'd on stop), not after ack_wait
    await eventually(lambda: len(started) == 2, timeout=5, what="the second attempt")
    release.set()
    assert await handle.result(timeout=10) == 2
    assert started == [("handed", 1), ("handed", 2)]


async def test_a_jobs_stream_of_another_shape_is_refused(client):
    from nats.js import api

    from framework import ConfigConflict

    await client.js.add_stream(api.StreamConfig(name="JOBS", subjects=["jobs.>"]))
    service, _ = reports()
    with pytest.raises(ConfigConflict, match="retention"):
        async with service.serve(client):
            pass
    with pytest.raises(ConfigConflict):
        await client.enqueue("reports.render", Render(1))


async def test_a_payload_too_large_is_refused_and_nothing_is_left(serve, client):
    service, _ = reports()
    await serve(service)
    huge = {"pages": 1, "padding": "x" * client.nc.max_payload}
    with pytest.raises(ServiceError) as refused:
        await client.enqueue("reports.render", huge, job_id="huge")
    assert refused.value.code in (413, 400)
    with pytest.raises(NotFound):
        await client.job("reports.render", "huge").status()
