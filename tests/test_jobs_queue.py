"""Jobs queued as their message alone, and successes recorded in bursts, against a real
server: ids stay unique, status stays visible, nothing is acked before it is recorded."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
from nats.js import api

from framework import JobContext, Service
from framework.jobs.backend import Backend
from framework.jobs.options import Kind
from framework.jobs.run import RunningJob
from framework.jobs.settle import Settler
from framework.jobs.status import JobStatus
from framework.testing import eventually

KIND = Kind.parse("reports.render")


class Render(msgspec.Struct):
    pages: int


def reports() -> tuple[Service, list[str]]:
    service = Service("reports")
    runs: list[str] = []

    @service.job("render")
    async def render(req: Render, job: JobContext) -> int:
        runs.append(job.job_id)
        return req.pages

    return service, runs


async def _queued(client: Any) -> int:
    return int((await client.js.stream_info("JOBS")).state.messages)


async def test_an_immediate_job_is_its_message_until_a_worker_runs_it(serve, client):
    handle = await client.enqueue("reports.render", Render(2), job_id="q-1", correlation_id="c-9")
    backend = await Backend.of(client)
    assert (await backend.store.get(KIND.status_key("q-1"))).status is None  # no record yet
    status = await handle.status()
    assert (status.state, status.payload, status.correlation_id) == ("queued", {"pages": 2}, "c-9")
    assert status.enqueued_at is not None and status.priority == "normal"
    listed = await backend.store.scan(KIND.key_filter)  # what `mesh jobs ls` reads
    assert [(s.id, s.state) for s in listed] == [("q-1", "queued")]
    states: list[str] = []

    async def follow() -> None:
        async for seen in handle.watch():
            states.append(seen.state)

    service, runs = reports()
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await eventually(lambda: states == ["queued"], what="the watch to show the message")
        await serve(service)
    assert states[0] == "queued" and states[-1] == "succeeded" and runs == ["q-1"]
    record = (await backend.store.get(KIND.status_key("q-1"))).status
    assert record is not None and record.state == "succeeded" and record.seq > 0
    assert record.correlation_id == "c-9" and record.payload == {"pages": 2}
    assert await _queued(client) == 0


async def test_one_job_id_is_one_job_across_priorities_and_delays(serve, client):
    first = await client.enqueue("reports.render", Render(1), job_id="u-1", priority="high")
    await client.enqueue("reports.render", Render(2), job_id="u-1", priority="low")
    await client.enqueue("reports.render", Render(3), job_id="u-1", delay=0.5)
    status = await first.status()
    assert (status.state, status.priority, status.payload) == ("queued", "high", {"pages": 1})
    delayed = await client.enqueue("reports.render", Render(4), job_id="u-2", delay=30)
    await client.enqueue("reports.render", Render(5), job_id="u-2")  # at once: the same job
    status = await delayed.status()
    assert (status.state, status.payload) == ("scheduled", {"pages": 4})
    assert await _queued(client) == 2  # u-1's message and u-2's schedule
    service, runs = reports()
    await serve(service)
    assert await first.result(timeout=10) == 1
    await anyio.sleep(1.0)  # a second message of u-1, had there been one, would run now
    assert runs == ["u-1"]
    assert await delayed.cancel() is True


async def test_a_finished_runs_message_still_there_makes_room_for_a_new_run(client):
    handle = await client.enqueue("reports.render", Render(1), job_id="r-1")  # no worker
    backend = await Backend.of(client)
    message = await backend.messages.find(KIND, "r-1")
    assert message is not None and message.revision == 0
    done = JobStatus(kind=str(KIND), id="r-1", state="succeeded", seq=message.seq, attempt=1)
    await backend.store.put(KIND.status_key("r-1"), done, 0)  # as a worker before its ack
    assert (await handle.status()).state == "succeeded"
    again = await client.enqueue("reports.render", Render(2), job_id="r-1")
    status = await again.status()
    assert (status.state, status.payload) == ("queued", {"pages": 2})
    newer = await backend.messages.find(KIND, "r-1")
    assert newer is not None and newer.seq > message.seq and await _queued(client) == 1
    # a queued run is the job: another enqueue of the id neither replaces nor adds one
    await client.enqueue("reports.render", Render(3), job_id="r-1")
    assert (await again.status()).payload == {"pages": 2} and await _queued(client) == 1


async def test_cancel_and_retry_of_a_job_queued_without_a_record(client):
    handle = await client.enqueue("reports.render", Render(7), job_id="c-1")
    backend = await Backend.of(client)
    message = await backend.messages.find(KIND, "c-1")
    assert message is not None
    assert await handle.cancel() is True
    record = (await backend.store.get(KIND.status_key("c-1"))).status
    assert record is not None and (record.state, record.seq) == ("cancelled", message.seq)
    assert record.payload == {"pages": 7} and await _queued(client) == 0
    assert await handle.cancel() is False
    await handle.retry()
    status = await handle.status()
    assert (status.state, status.payload, status.attempt) == ("queued", {"pages": 7}, 0)
    assert await _queued(client) == 1


async def _real_messages(client: Any, count: int) -> list[Any]:
    """Messages delivered by a real pull consumer, to settle (ack or nak) for real."""
    await client.js.add_stream(api.StreamConfig(name="SETTLE_T", subjects=["settle.t"]))
    for n in range(count):
        await client.js.publish("settle.t", str(n).encode())
    sub = await client.js.pull_subscribe("settle.t", durable="settle_t")
    return list(await sub.fetch(count, timeout=5))


def _running(job_id: str, seq: int) -> JobStatus:
    started = datetime.now(UTC)
    return JobStatus(
        kind=str(KIND), id=job_id, state="running", attempt=1, seq=seq, worker="w-1",
        started_at=started,
    )  # fmt: skip


async def test_the_settler_writes_a_burst_and_acks_only_what_is_recorded(client):
    backend = await Backend.of(client)
    store = backend.store
    msgs = await _real_messages(client, 3)
    runs = {name: RunningJob(store, KIND.status_key(name), _running(name, 50), 0, claimed=False)
            for name in ("new", "rerun", "cancelled")}  # fmt: skip
    earlier = JobStatus(kind=str(KIND), id="rerun", state="succeeded", seq=10, attempt=1)
    await store.put(runs["rerun"].key, earlier, 0)  # an earlier run's: replaced
    cancel = JobStatus(kind=str(KIND), id="cancelled", state="cancelled", seq=50)
    await store.put(runs["cancelled"].key, cancel, 0)  # written for this very message
    recorded: list[tuple[str, bool, str | None]] = []
    settled: list[Any] = []

    async def on_recorded(run: RunningJob, msg: Any, written: bool) -> None:
        recorded.append((run.status.id, written, run.stopped_by))
        if written:
            await msg.ack()

    async with anyio.create_task_group() as tg:
        settler = Settler(store, tg, on_recorded, settled.append, retry_after=0.1)
        for run, msg in zip(runs.values(), msgs, strict=True):
            assert run.hand_over()
            done = msgspec.structs.replace(run.status, state="succeeded", progress=1.0)
            settler.add(run, done, msgspec.json.encode(done), msg)
        assert await settler.wait(5)
    assert sorted(recorded) == [
        ("cancelled", False, "cancelled"), ("new", True, None), ("rerun", True, None)
    ]  # fmt: skip
    assert len(settled) == 3 and settler.pending == 0
    states = {name: (await store.get(run.key)).status for name, run in runs.items()}
    assert {name: s.state for name, s in states.items() if s} == {
        "new": "succeeded", "rerun": "succeeded", "cancelled": "cancelled"
    }  # fmt: skip
    info = await client.js.consumer_info("SETTLE_T", "settle_t")
    assert info.num_ack_pending == 1  # the cancelled one's was not acked here


async def test_the_dashboard_counts_and_lists_jobs_queued_without_a_record(serve, client):
    from framework.web.dashboard.jobs import JobsWatch
    from framework.web.dashboard.sampler import Hub

    watch = JobsWatch(client, Hub(), declared=lambda: ["reports.render"])

    def counts() -> dict[str, int]:
        return {k["kind"]: k["counts"] for k in watch.view()["kinds"]}.get("reports.render", {})

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run)
        for n in range(3):
            await client.enqueue("reports.render", Render(n), job_id=f"d-{n}")
        await eventually(lambda: counts() == {"queued": 3}, what="3 queued jobs in the view")
        rows = {row["id"]: row for row in watch.view()["jobs"]}
        assert rows["d-1"]["state"] == "queued" and rows["d-1"]["kind"] == "reports.render"
        assert await client.job("reports.render", "d-0").cancel() is True
        service, runs = reports()
        await serve(service)
        await eventually(
            lambda: counts() == {"succeeded": 2, "cancelled": 1}, what="the jobs' records"
        )
        tg.cancel_scope.cancel()
    assert sorted(runs) == ["d-1", "d-2"]
