"""Background jobs: enqueue, watch progress, get the result; unique ids, delays, cancel,
recurring schedules, retries and dead letters.

A job is a command to one worker pool with a lifecycle: `@service.job` declares the
kind `reports.render`, `client.enqueue` returns a `JobHandle` at once, and the handle
reads the job's status record (a JetStream key-value bucket) or watches it change.
Delays and schedules are the server's message schedules: no scheduler process.

Run: `python examples/background_jobs.py` (NATS_URL, default nats://127.0.0.1:4222).
"""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from framework import JobContext, JobFailed, Service, configure_logging, connect


class RenderReport(msgspec.Struct):
    title: str
    pages: int


class Rendered(msgspec.Struct):
    url: str
    pages: int


reports = Service("reports", version="1.0.0")
ticks: list[str] = []


@reports.job("render", max_concurrency=4, timeout=30, max_attempts=3, backoff=[0.2])
async def render(req: RenderReport, job: JobContext) -> Rendered:
    for page in range(req.pages):
        await asyncio.sleep(0.3)  # the real work
        await job.progress((page + 1) / req.pages, f"page {page + 1} of {req.pages}")
    return Rendered(url=f"/reports/{job.job_id}.pdf", pages=req.pages)


@reports.job("flaky", max_attempts=2, backoff=[0.2])
async def flaky(job: JobContext) -> None:
    raise ConnectionError(f"mail server down (attempt {job.attempt})")


@reports.job("tick")
async def tick(job: JobContext) -> None:
    ticks.append(job.job_id)


async def run() -> None:
    run_id = uuid.uuid4().hex[:6]
    async with reports.serve(), connect() as client:
        handle = await client.enqueue(
            "reports.render", RenderReport("Q3", 4), job_id=f"q3-{run_id}", returns=Rendered
        )
        async for status in handle.watch():  # a key watch: pushed, not polled
            print(f"{status.state:<9} {status.progress:4.0%} {status.message}")
        result = await handle.result(timeout=10)
        print(f"result: {result.url} ({result.pages} pages)")

        again = await client.enqueue("reports.render", RenderReport("Q3", 4), job_id=handle.id)
        print(f"same id while it exists unfinished -> the same job: {again.id == handle.id}")

        later = await client.enqueue("reports.render", RenderReport("Q4", 1), delay=60)
        print(f"delayed job is {(await later.status()).state}; cancelled: {await later.cancel()}")

        name = await client.schedule("reports.tick", every=1, name=f"tick-{run_id}")
        async with asyncio.timeout(10):
            while len(ticks) < 2:  # noqa: ASYNC110 (the server fires it, once a second)
                await asyncio.sleep(0.05)
        await client.unschedule("reports.tick", name)
        await asyncio.sleep(0.5)  # a firing already on its way is still handled
        fired = len(ticks)
        await asyncio.sleep(1.5)
        print(f"schedule fired every second, then stopped: {len(ticks) == fired}")

        try:
            await (await client.enqueue("reports.flaky")).result(timeout=10)
        except JobFailed as failed:
            print(f"failed after {failed.status.attempt} attempts: {failed.status.error}")
            print("its message is in the DEADLETTER stream: `mesh dlq ls`, `mesh dlq replay`")


if __name__ == "__main__":
    configure_logging(level="WARNING")
    asyncio.run(run())
