"""One timer for many tasks that share a time limit (a subscriber's `max_processing_time`).

`asyncio.timeout` schedules and cancels a timer per use: about a tenth of the CPU an
event costs a subscriber. Every handler of a subscriber has the same limit, so the
deadlines expire in the order they were set, and one timer, kept for the oldest
deadline, serves them all: watching a task is a dict insert and a delete.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Watchdog"]


class Watchdog:
    """Cancels a watched task once `limit` seconds have passed since `start`.

    key, task = watchdog.start()
    try:
        await work()
    except asyncio.CancelledError:
        if watchdog.fired(key, task):
            raise TooSlow from None  # our cancellation, not one from outside
        raise
    finally:
        watchdog.stop(key, task)
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._watched: dict[int, tuple[float, asyncio.Task[Any]]] = {}  # oldest first
        self._cancelled: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._count = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> tuple[int, asyncio.Task[Any]]:
        loop = self._loop
        if loop is None:  # looked up once: asyncio's lookup asks the kernel for the pid
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "a watchdog watches tasks"
        self._count += 1
        key = self._count
        deadline = loop.time() + self.limit
        self._watched[key] = (deadline, task)
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return key, task

    def fired(self, key: int, task: asyncio.Task[Any]) -> bool:
        """Whether a CancelledError in `task` is this watchdog's doing alone."""
        if key not in self._cancelled:
            return False
        self._cancelled.discard(key)
        return task.uncancel() == 0

    def stop(self, key: int, task: asyncio.Task[Any]) -> None:
        self._watched.pop(key, None)
        if key in self._cancelled:  # cancelled, but the work swallowed the CancelledError
            self._cancelled.discard(key)
            task.uncancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self._watched:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for key, (deadline, task) in list(self._watched.items()):
            if deadline > now:  # the oldest still running: wake up again at its deadline
                self._timer = loop.call_at(deadline, self._expire)
                return
            del self._watched[key]
            self._cancelled.add(key)
            task.cancel()
