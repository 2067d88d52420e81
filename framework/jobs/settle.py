"""Outcomes of finished jobs, recorded together; each message acked once its record is.

A pool task whose handler succeeded would otherwise wait a round trip for the record
of the outcome before it could take the next job: a task switch and a wait per job,
the largest cost of a short job. Here it hands the outcome over and moves on. The
outcomes handed over in one event-loop iteration are written as one burst of
compare-and-set puts with one wait for all their replies, and each message is acked
as soon as its own record is stored. An outcome whose put is refused (the record
changed: a cancel, another attempt) or not answered is settled the long way, as a
pool task would: the record is read, and written again only if it is still this
attempt's. The guarantee is unchanged: no message is acked before its outcome is
recorded; one whose outcome cannot be recorded is nak'd, and runs again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from ..observability.logging import get_logger
from .run import RunningJob
from .status import JobStatus
from .store import StatusStore

__all__ = ["Settler"]

_log = get_logger("framework.jobs")

# what happens once an outcome is (or is not) recorded: the ack and the counts
Recorded = Callable[[RunningJob, Any, bool], Awaitable[None]]
_Entry = tuple[RunningJob, JobStatus, bytes, Any]  # the run, its outcome, encoded, message


class Settler:
    """Writes handed-over outcomes in bursts (see the module)."""

    def __init__(
        self,
        store: StatusStore,
        task_group: TaskGroup,
        recorded: Recorded,
        settled: Callable[[Any], None],
        *,
        retry_after: float,
    ) -> None:
        """`recorded(run, msg, written)` acks (or not) once the write is decided;
        `settled(msg)` is told when the message is done with, whatever happened."""
        self._store = store
        self._task_group = task_group
        self._recorded = recorded
        self._settled = settled
        self._retry_after = retry_after
        self._queued: list[_Entry] = []
        self.pending = 0  # outcomes handed over and not settled yet
        self._idle = anyio.Event()
        self._idle.set()

    def add(self, run: RunningJob, status: JobStatus, data: bytes, msg: Any) -> None:
        """Record `status` (encoded: `data`) for `run`, then settle `msg`."""
        self._queued.append((run, status, data, msg))
        self.pending += 1
        if self._idle.is_set():
            self._idle = anyio.Event()
        if len(self._queued) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        if batch:
            self._task_group.start_soon(self._write, batch)

    async def wait(self, timeout: float) -> bool:
        """Whether everything handed over was settled within `timeout` seconds."""
        with anyio.move_on_after(timeout):
            while self.pending:
                await self._idle.wait()
                await anyio.lowlevel.checkpoint()
            return True
        return False

    async def _write(self, batch: list[_Entry]) -> None:
        done = 0
        try:
            results = await self._store.put_all([(r.key, d, r.revision) for r, _, d, _ in batch])
            for entry, result in zip(batch, results, strict=True):
                done += 1
                await self._settle(entry, result)
        finally:
            for _, _, _, msg in batch[done:]:  # cancelled: redelivered after ack_wait
                self._settled(msg)
            self.pending -= len(batch)
            if not self.pending:
                self._idle.set()

    async def _settle(self, entry: _Entry, result: int | Exception) -> None:
        run, status, data, msg = entry
        try:
            if isinstance(result, int):
                run.written(status, result)
                written = True
            else:
                written = await run.finish_after(status, data, result)
            await self._recorded(run, msg, written)
        except Exception as exc:  # not recorded: the job runs again
            _log.error("job outcome not stored, will retry", key=run.key, error=str(exc))
            try:
                await msg.nak(delay=self._retry_after)
            except Exception:
                pass  # redelivered after ack_wait instead
        finally:
            self._settled(msg)
