"""Bounded concurrent dispatch of a subscription's messages.

nats-py runs a subscription callback one message at a time (and its `micro` module
inherits that). Here the callback hands each message to a fixed pool of worker tasks
through a bounded queue: at most `max_concurrency` handlers run at once, at most as many
messages wait for a worker, and a full queue pushes back into the subscription's
bounded pending queue. No task is spawned per message.

The hand-off never yields to the event loop while a slot is free: nats-py's callback
task then drains everything one socket read delivered, the workers run in the next
loop iteration, and their replies leave in one write, as with a plain callback. (A
hand-off that yields per message, like an anyio memory stream's `send`, costs a loop
iteration and a socket write per reply: about 3x the CPU of the raw callback.) nats-py
is asyncio-only, so an asyncio queue loses no portability.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

__all__ = ["WorkerPool"]

_log = structlog.get_logger("framework.dispatch")

_STOP: Any = object()


class WorkerPool:
    def __init__(self, handle: Callable[[Any], Awaitable[None]], size: int) -> None:
        if size < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._handle = handle
        self._size = size
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=size)
        self._closed = False
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()

    @property
    def size(self) -> int:
        return self._size

    def start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._run)

    async def submit(self, message: Any) -> None:
        """No yield while there is room; waits when the queue is full (backpressure)."""
        if self._closed:
            return  # stopping: the subscription is drained first, so this is a straggler
        queue = self._queue
        if queue.full():
            await queue.put(message)
        else:
            queue.put_nowait(message)

    async def _run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as workers:
                    for _ in range(self._size):
                        workers.start_soon(self._work)
        finally:
            self._done.set()

    async def _work(self) -> None:
        get, handle = self._queue.get, self._handle
        while (message := await get()) is not _STOP:
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
                    await self._queue.put(_STOP)
            await self._done.wait()
            return True
        self._scope.cancel()
        await self._done.wait()
        return False
