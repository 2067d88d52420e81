"""Deadlines of many requests and handlers on one event-loop timer.

`asyncio.timeout` costs about 5 us per use on Python 3.11 (a `Timeout` object, a
`TimerHandle` pushed on the loop's heap and cancelled again, a `current_task` lookup):
per request, the largest single cost of a call that carries a deadline. Here a
deadline is an entry in one heap per owner (a connection's request multiplexer, an
RPC endpoint), and one loop timer is kept for the earliest entry. An entry removed
before its time is only forgotten (`done`); the heap drops such entries when they
come up, and is rebuilt from the live ones when they are outnumbered, so its size
stays proportional to what is in flight.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any

from ..observability.logging import get_logger

__all__ = ["Deadlines"]

_log = get_logger("framework.transport.timers")

_SLACK = 64  # stale heap entries tolerated beyond twice the live ones


class Deadlines:
    """Calls `expire(target)` for each target whose deadline (loop time) has passed.

    `add` returns a key; `done(key)` before the deadline means it never fires. The
    callback runs from the loop's timer, never from inside `add` or `done`.
    """

    __slots__ = ("_count", "_expire", "_heap", "_live", "_loop", "_timer", "_timer_at")

    def __init__(self, expire: Callable[[Any], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, Any] = {}
        self._count = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._live)

    def add(self, timeout: float, target: Any) -> int:
        """Watch `target` for `timeout` seconds from now; returns the key for `done`."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._count += 1
        key = self._count
        when = loop.time() + timeout
        self._live[key] = target
        heap = self._heap
        if len(heap) > 2 * len(self._live) + _SLACK:
            self._compact()
        heapq.heappush(heap, (when, key))
        if self._timer is None or when < self._timer_at:
            self._arm(loop, when)
        return key

    def done(self, key: int) -> None:
        """The target finished in time (or is no longer watched)."""
        self._live.pop(key, None)

    def close(self) -> None:
        """Forget everything and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
        self._live.clear()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._fire)

    def _compact(self) -> None:
        live = self._live
        self._heap = [entry for entry in self._heap if entry[1] in live]
        heapq.heapify(self._heap)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        heap, live = self._heap, self._live
        expired: list[Any] = []
        while heap and heap[0][0] <= now:
            target = live.pop(heapq.heappop(heap)[1], None)
            if target is not None:
                expired.append(target)
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)
        if heap:
            self._arm(loop, heap[0][0])
        for target in expired:  # last: a callback may add or end entries
            try:
                self._expire(target)
            except Exception as exc:  # one failing must not strand the rest, forever
                _log.error("deadline callback failed", error=repr(exc), exc_info=exc)
