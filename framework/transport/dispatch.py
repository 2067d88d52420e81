"""Bounded concurrent dispatch of a subscription's messages.

nats-py runs a subscription callback one message at a time (and its `micro` module
inherits that). Here the callback hands each message to a fixed pool of worker tasks
through a bounded queue: at most `max_concurrency` handlers run at once, at most as many
messages (or the pool's `queue`) wait for a worker, and a full queue pushes back into
the subscription's bounded pending queue. No task is spawned per message, and a worker is woken only when
no other is already on its way (see `WorkerPool._wake_one`).

The hand-off never yields to the event loop while a slot is free: nats-py's callback
task then drains everything one socket read delivered, the workers run in the next
loop iteration, and their replies leave in one write, as with a plain callback. (A
hand-off that yields per message, like an anyio memory stream's `send`, costs a loop
iteration and a socket write per reply: about 3x the CPU of the raw callback.) nats-py
is asyncio-only, so asyncio futures lose no portability.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ..observability.logging import get_logger

__all__ = ["WorkerPool"]

_log = get_logger("framework.transport.dispatch")

_STOP: Any = object()


class WorkerPool:
    def __init__(
        self,
        handle: Callable[[Any], Awaitable[None]],
        size: int,
        *,
        on_idle: Callable[[], None] | None = None,
        queue: int | None = None,
    ) -> None:
        """`on_idle` runs whenever a worker finds nothing waiting, before it parks: in
        the same task step as the handlers it ran (a settlement flushes there what
        they handed over, instead of one event-loop iteration later). `queue` (default
        `size`) is how many messages may wait for a worker; a caller that bounds what
        it hands over itself may allow more, so that its bound, not the pool's, decides."""
        if size < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._handle = handle
        self._on_idle = on_idle
        self._size = size
        self._queue = queue or size
        self._waiting: deque[Any] = deque()  # at most `queue` messages
        self._idle: deque[asyncio.Future[None]] = deque()  # one per idle worker, a stack
        self._waking = 0  # workers woken that have not run yet
        self._room: deque[asyncio.Future[None]] = deque()  # submits waiting for room
        self._closed = False
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()

    @property
    def size(self) -> int:
        return self._size

    def start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._run)

    async def submit(self, message: Any) -> None:
        """No yield while there is room; waits when `size` messages wait (backpressure)."""
        if self._closed:
            return  # stopping: the subscription is drained first, so this is a straggler
        await self._enqueue(message)

    def offer(self, message: Any) -> bool:
        """`submit` without waiting: False (nothing taken) when `queue` messages wait or
        the pool is closing. For callers that bound what they hand over themselves."""
        if self._closed or len(self._waiting) >= self._queue:
            return False
        self._waiting.append(message)
        self._wake_one()
        return True

    async def _enqueue(self, message: Any) -> None:
        while len(self._waiting) >= self._queue:
            room = asyncio.get_running_loop().create_future()
            self._room.append(room)
            try:
                await room
            finally:
                if not room.done() and room in self._room:
                    self._room.remove(room)  # cancelled while waiting
        self._waiting.append(message)
        self._wake_one()

    def _wake_one(self) -> None:
        """Wake an idle worker unless one is already on its way.

        The woken worker takes a message and, if more wait, wakes the next before its
        handler runs, so a handler that blocks never holds up the rest; handlers that
        finish without blocking are run one after another by the same worker, in one
        task step, as a plain callback would: no task switch per message.
        """
        while self._waking == 0 and self._idle:
            worker = self._idle.pop()  # the last to go idle: a warm worker, few in use
            if not worker.done():  # a worker cancelled while idle is skipped
                worker.set_result(None)
                self._waking = 1

    async def _run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as workers:
                    for _ in range(self._size):
                        workers.start_soon(self._work)
        finally:
            self._done.set()

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        waiting, handle = self._waiting, self._handle
        on_idle = self._on_idle
        while True:
            if not waiting:
                if on_idle is not None:
                    on_idle()
                idle = loop.create_future()
                self._idle.append(idle)
                try:
                    await idle
                finally:
                    if idle.done() and not idle.cancelled():
                        self._waking = 0
                continue
            message = waiting.popleft()
            while self._room:  # one submit waiting for room may go on
                room = self._room.popleft()
                if not room.done():
                    room.set_result(None)
                    break
            if waiting:
                self._wake_one()
            if message is _STOP:
                return
            try:
                await handle(message)
            except Exception as exc:  # the pool outlives any one message
                _log.error("message handler crashed", error=repr(exc), exc_info=exc)

    async def close(self, grace: float) -> bool:
        """Let queued and running handlers finish within `grace` seconds, then cancel them.

        Returns True when everything finished in time.
        """
        with anyio.move_on_after(grace):
            if not self._closed:
                self._closed = True
                for _ in range(self._size):  # behind every queued message
                    await self._enqueue(_STOP)
            await self._done.wait()
            return True
        self._scope.cancel()
        await self._done.wait()
        return False
