"""Bounded concurrent dispatch of a subscription's messages.

nats-py runs a subscription callback one message at a time (and its `micro` module
inherits that). Here the callback hands each message to a fixed pool of worker tasks
through an unbuffered anyio stream: at most `max_concurrency` handlers run at once,
a full pool pushes back into the subscription's bounded pending queue, and no task is
spawned per message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["WorkerPool"]


class WorkerPool:
    def __init__(self, handle: Callable[[Any], Awaitable[None]], size: int) -> None:
        if size < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._handle = handle
        self._size = size
        self._send: MemoryObjectSendStream[Any]
        self._receive: MemoryObjectReceiveStream[Any]
        self._send, self._receive = anyio.create_memory_object_stream[Any](0)
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()

    @property
    def size(self) -> int:
        return self._size

    def start(self, task_group: TaskGroup) -> None:
        task_group.start_soon(self._run)

    async def submit(self, message: Any) -> None:
        """Waits while every worker is busy: backpressure instead of an unbounded queue."""
        await self._send.send(message)

    async def _run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as workers:
                    for _ in range(self._size):
                        workers.start_soon(self._work, self._receive.clone())
                self._receive.close()
        finally:
            self._done.set()

    async def _work(self, receive: MemoryObjectReceiveStream[Any]) -> None:
        async with receive:
            async for message in receive:
                await self._handle(message)

    async def close(self, grace: float) -> bool:
        """Let running handlers finish within `grace` seconds, then cancel them.

        Returns True when everything finished in time.
        """
        self._send.close()
        self._receive.close()
        with anyio.move_on_after(grace):
            await self._done.wait()
            return True
        self._scope.cancel()
        await self._done.wait()
        return False
