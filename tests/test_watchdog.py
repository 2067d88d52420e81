"""The shared processing-time watchdog on its own."""

from __future__ import annotations

import asyncio

import pytest

from framework.events.watchdog import Watchdog


class TooSlow(Exception):
    pass


async def guarded(watchdog: Watchdog, seconds: float) -> str:
    key, task = watchdog.start()
    try:
        await asyncio.sleep(seconds)
        return "finished"
    except asyncio.CancelledError:
        if watchdog.fired(key, task):
            raise TooSlow from None
        raise
    finally:
        watchdog.stop(key, task)


async def test_only_the_tasks_past_the_limit_are_cancelled():
    watchdog = Watchdog(0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    results = await asyncio.gather(
        guarded(watchdog, 0.05),
        guarded(watchdog, 5.0),
        guarded(watchdog, 0.1),
        guarded(watchdog, 5.0),
        return_exceptions=True,
    )
    elapsed = loop.time() - started
    assert results[0] == results[2] == "finished"
    assert isinstance(results[1], TooSlow) and isinstance(results[3], TooSlow)
    assert 0.2 <= elapsed < 1.0
    watchdog.close()


async def test_many_watched_tasks_share_one_timer():
    watchdog = Watchdog(30.0)
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    tasks = [asyncio.create_task(guarded(watchdog, 0.05)) for _ in range(100)]
    await asyncio.sleep(0.01)
    # the 100 sleeps schedule their own timers; the watchdog adds one, not 100
    assert len(loop._scheduled) - before == 100 + 1  # type: ignore[attr-defined]
    assert await asyncio.gather(*tasks) == ["finished"] * 100
    watchdog.close()


async def test_a_cancellation_from_outside_is_not_reported_as_too_slow():
    watchdog = Watchdog(30.0)
    task = asyncio.create_task(guarded(watchdog, 5.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watchdog.close()


async def test_later_deadlines_still_fire_after_earlier_tasks_finished():
    watchdog = Watchdog(0.2)
    assert await guarded(watchdog, 0.0) == "finished"  # its timer stays set
    await asyncio.sleep(0.1)
    with pytest.raises(TooSlow):  # started 0.1 s later: the timer re-arms for it
        await guarded(watchdog, 5.0)
    watchdog.close()


async def test_a_task_that_swallows_the_cancellation_is_left_clean():
    watchdog = Watchdog(0.05)

    async def stubborn() -> int:
        key, task = watchdog.start()
        try:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                pass  # a badly behaved handler
        finally:
            watchdog.stop(key, task)
        await asyncio.sleep(0.01)  # not cancelled again later
        return asyncio.current_task().cancelling()  # type: ignore[union-attr]

    assert await stubborn() == 0
    watchdog.close()
