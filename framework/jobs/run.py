"""One attempt of a job on a worker: its record, its cancel scope, its progress.

Every write names the revision it replaces. When a write finds the record changed, the
record is read again: `cancelled` (a client cancelled the job) or another attempt
running it means this attempt stops (its handler is cancelled) and writes nothing more.
Progress is coalesced: a report is written at once if the last write is at least
`PROGRESS_INTERVAL` old, otherwise kept and written by the worker's flusher within
that interval, so a handler reporting 10,000 times a second writes about 5 times.

A first delivery starts its handler before `running` is written (`claimed` False): the
record still says queued, at the revision the message carries, and the worker's
flusher writes `running` once the handler has run `CLAIM_DELAY` seconds. A job that
ends sooner is recorded once, with its outcome (compare-and-set against the queued
record, so a cancel in between is never overwritten): one write per job instead of two.
A job queued without a record (`messages`) is written as a new record; what it finds
in the way instead is either written for this message (a cancel: it stops) or a
finished record of an earlier run of the id, which it replaces.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import anyio
import msgspec
from nats.errors import TimeoutError as NatsTimeoutError

from ..observability.logging import get_logger
from .status import JobStatus
from .store import Conflict, StatusStore

__all__ = ["PROGRESS_INTERVAL", "RunningJob"]

_log = get_logger("framework.jobs")

PROGRESS_INTERVAL = 0.2
CLAIM_DELAY = 0.1
Stop = Literal["cancelled", "superseded"]


class RunningJob:
    """The claimed record of one attempt; the worker's handle on the handler."""

    __slots__ = (
        "_lock",
        "_pending",
        "claimed",
        "ended",
        "fresh",
        "key",
        "last_write",
        "revision",
        "scope",
        "started",
        "status",
        "stopped_by",
        "store",
    )

    def __init__(
        self,
        store: StatusStore,
        key: str,
        status: JobStatus,
        revision: int,
        *,
        claimed: bool = True,
    ) -> None:
        self.store = store
        self.key = key
        self.status = status
        self.revision = revision
        self.scope = anyio.CancelScope()
        self.stopped_by: Stop | None = None
        self.ended = False  # the outcome is being written: no more progress
        self.claimed = claimed  # `status` is written (else the record is still queued)
        self.fresh = revision == 0 and not claimed  # queued without a record
        self.started = self.last_write = time.monotonic()
        self._lock = asyncio.Lock()  # taken without a yield when free (anyio's yields)
        self._pending: tuple[float, str] | None = None

    def stop(self, reason: Stop) -> None:
        """Cancel the handler (a cancel notice, or the record says so)."""
        if self.stopped_by is None:
            self.stopped_by = reason
        self.scope.cancel()

    # -- progress --------------------------------------------------------------------

    def report(self, fraction: float, message: str | None) -> bool:
        """Keep the newest progress; True when it should be written now."""
        fraction = min(1.0, max(0.0, float(fraction)))
        text = message if message is not None else self._message()
        self._pending = (fraction, text)
        return time.monotonic() - self.last_write >= PROGRESS_INTERVAL and not self._lock.locked()

    def _message(self) -> str:
        return self._pending[1] if self._pending is not None else self.status.message

    @property
    def latest_message(self) -> str:
        """The newest progress message, written or not (the outcome carries it)."""
        return self._message()

    @property
    def due(self) -> bool:
        """Progress to write, or `running` not written yet and the handler still busy."""
        if self.ended:
            return False
        if self._pending is not None:
            return True
        return not self.claimed and time.monotonic() - self.started >= CLAIM_DELAY

    async def flush(self) -> None:
        """Write the kept progress, or `running` if not written yet (while the attempt
        is still going)."""
        if not self.due or self._lock.locked():
            return
        async with self._lock:
            pending, self._pending = self._pending, None
            if self.ended or (pending is None and self.claimed):
                return
            status = self.status
            if pending is not None:
                fraction, message = pending
                status = msgspec.structs.replace(status, progress=fraction, message=message)
            try:
                await self._write(status)
            except Exception as exc:  # progress is best effort; the outcome is not
                _log.warning("job progress not stored", key=self.key, error=str(exc))

    # -- writes ----------------------------------------------------------------------

    async def finish(self, status: JobStatus, data: bytes | None = None) -> bool:
        """Write the attempt's outcome (`data`: already encoded); False when the record
        is no longer this attempt's (cancelled or taken over): then nothing was written."""
        self.ended = True
        async with self._lock:
            return await self._write(status, data)

    def hand_over(self) -> bool:
        """Whether the outcome may be written by someone else (`settle.Settler`): no
        write of this attempt is under way and none will start (progress is over)."""
        if self.stopped_by is not None or self._lock.locked():
            return False
        self.ended = True
        return True

    def written(self, status: JobStatus, revision: int) -> None:
        """`status` is stored, at `revision`."""
        self.status = status
        self.revision = revision
        self.claimed = True
        self.last_write = time.monotonic()

    async def finish_after(self, status: JobStatus, data: bytes, error: Exception) -> bool:
        """The outcome's write (handed over) was not stored, or not surely: read the
        record and write again if it is still this attempt's. Raises if that fails."""
        async with self._lock:
            if not isinstance(error, Conflict | NatsTimeoutError):
                raise error
            if self.stopped_by is not None or not await self._still_ours():
                return False
            self.written(status, await self.store.put(self.key, status, self.revision, data))
            return True

    async def _write(self, status: JobStatus, data: bytes | None = None) -> bool:
        if self.stopped_by is not None:
            return False
        try:
            revision = await self.store.put(self.key, status, self.revision, data)
        except Conflict:
            if not await self._still_ours():
                return False
            revision = await self.store.put(self.key, status, self.revision, data)
        self.written(status, revision)
        return True

    async def _still_ours(self) -> bool:
        """Read the changed record: stop unless it is still this attempt's (or, for a
        job queued without a record, unless it is none or an earlier run's)."""
        entry = await self.store.get(self.key)
        current = entry.status
        mine = self.status
        if self.fresh and not self.claimed:
            if current is None or (current.final and current.seq < mine.seq):
                self.revision = entry.revision
                return True
        if current is None or current.state == "cancelled":
            self.stop("cancelled")
            return False
        if (current.seq, current.worker, current.attempt) != (mine.seq, mine.worker, mine.attempt):
            self.stop("superseded")
            return False
        self.revision = entry.revision
        return True
