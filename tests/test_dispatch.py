"""The worker pool on its own: bounds, hand-off without a task switch, no stalls."""

from __future__ import annotations

import asyncio

import anyio

from framework.testing import eventually
from framework.transport.dispatch import WorkerPool


async def _burst(pool: WorkerPool, count: int) -> None:
    for i in range(count):
        await pool.submit(i)


async def test_a_burst_wakes_one_worker_not_one_per_message():
    ran_in: list[asyncio.Task] = []

    async def handle(message: int) -> None:
        ran_in.append(asyncio.current_task())

    pool = WorkerPool(handle, 16)
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_soon = loop.call_soon

    def counting_call_soon(*args, **kwargs):  # every task wake-up goes through here
        nonlocal scheduled
        scheduled += 1
        return call_soon(*args, **kwargs)

    async with anyio.create_task_group() as tg:
        pool.start(tg)
        await anyio.sleep(0.01)  # every worker idle
        loop.call_soon = counting_call_soon  # type: ignore[method-assign]
        try:
            await _burst(pool, 16)  # what one socket read delivers, in one task step
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        finally:
            del loop.call_soon
        assert len(ran_in) == 16
        assert len(set(ran_in)) == 1  # one worker ran the burst back to back
        # ...and the other 15 were not woken to find nothing (a queue wakes one each)
        assert scheduled <= 4, scheduled
        assert await pool.close(1.0)


async def test_a_blocking_handler_does_not_hold_up_the_others():
    release = anyio.Event()
    started: list[int] = []

    async def handle(message: int) -> None:
        started.append(message)
        await release.wait()

    pool = WorkerPool(handle, 8)
    async with anyio.create_task_group() as tg:
        pool.start(tg)
        await anyio.sleep(0.01)
        await _burst(pool, 8)
        # each blocked handler woke the next worker
        await eventually(lambda: len(started) >= 8, 2, "eight handlers started", 0.001)
        assert sorted(started) == list(range(8))
        release.set()
        assert await pool.close(1.0)


async def test_at_most_size_handlers_run_and_at_most_size_wait():
    release = anyio.Event()
    running = 0
    most = 0

    async def handle(message: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1

    pool = WorkerPool(handle, 4)
    submitted = 0
    async with anyio.create_task_group() as tg:
        pool.start(tg)

        async def feed() -> None:
            nonlocal submitted
            for i in range(20):
                await pool.submit(i)
                submitted += 1

        tg.start_soon(feed)
        await anyio.sleep(0.1)
        assert most == 4  # four run
        assert submitted == 8  # four more wait; the ninth submit waits for room
        release.set()
        await eventually(lambda: submitted >= 20, 2, "all 20 submitted", 0.001)
        assert await pool.close(1.0)
    assert most == 4


async def test_a_crashing_handler_does_not_lose_the_worker():
    handled: list[int] = []

    async def handle(message: int) -> None:
        if message % 2:
            raise RuntimeError("boom")
        handled.append(message)

    pool = WorkerPool(handle, 1)
    async with anyio.create_task_group() as tg:
        pool.start(tg)
        await _burst(pool, 1)
        for i in range(1, 10):
            await pool.submit(i)
        assert await pool.close(1.0)
    assert handled == [0, 2, 4, 6, 8]


async def test_close_finishes_queued_messages_then_cancels_after_grace():
    handled: list[int] = []

    async def handle(message: int) -> None:
        if message == 99:
            await anyio.sleep(60)
        handled.append(message)

    pool = WorkerPool(handle, 2)
    async with anyio.create_task_group() as tg:
        pool.start(tg)
        await _burst(pool, 3)
        await pool.submit(99)
        with anyio.fail_after(5):
            assert await pool.close(0.2) is False  # 99 was still running: cancelled
    assert handled == [0, 1, 2]


async def test_several_submitters_waiting_for_room_all_get_through():
    release = anyio.Event()
    handled: list[int] = []

    async def handle(message: int) -> None:
        await release.wait()
        handled.append(message)

    pool = WorkerPool(handle, 2)
    async with anyio.create_task_group() as tg:
        pool.start(tg)
        for start in (0, 100, 200):  # three producers, each blocked on a full pool

            async def feed(first: int) -> None:
                for i in range(first, first + 5):
                    await pool.submit(i)

            tg.start_soon(feed, start)
        await anyio.sleep(0.05)
        release.set()
        await eventually(lambda: len(handled) >= 15, 2, "all 15 handled", 0.001)
        assert await pool.close(1.0)
    assert sorted(handled) == [*range(5), *range(100, 105), *range(200, 205)]
