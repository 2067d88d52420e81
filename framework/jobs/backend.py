"""The jobs machinery of one connection: stream checked, buckets opened, once.

A `Client` is shared by many tasks; the first one that enqueues (or a worker that
starts) declares the stream and opens the buckets, the others wait for it and reuse
what it opened. Kept beside the client, not in it, so `client` stays free of jobs.
Also where a job's state is read whole: its record, or its message while it is queued
without one (`messages`).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

from .barrier import ReadBarrier
from .declare import ensure_jobs_stream, open_kinds_bucket, open_status_bucket
from .kinds import KindRegistry
from .messages import JobMessage, JobMessages, message_status, supersedes
from .options import Kind
from .status import JobStatus
from .store import Entry, StatusStore

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Backend"]


class Backend:
    """Status store, job messages and kind registry of one client."""

    def __init__(self, client: Client, store: StatusStore, kinds: KindRegistry) -> None:
        self.client = client
        self.store = store
        self.messages = store.messages
        self.kinds = kinds
        self.barrier = ReadBarrier(client.nc)  # shared by the connection's workers

    @classmethod
    async def of(cls, client: Client) -> Backend:
        """The client's backend, created (stream checked, buckets opened) on first use."""
        backend = _backends.get(client)
        if backend is not None:
            return backend
        lock = _locks.setdefault(client, asyncio.Lock())
        async with lock:
            backend = _backends.get(client)
            if backend is None:
                await ensure_jobs_stream(client)
                mux = await client.mux()
                store = StatusStore(mux, await open_status_bucket(client), JobMessages(mux))
                backend = cls(client, store, KindRegistry(await open_kinds_bucket(client)))
                _backends[client] = backend
        return backend

    async def read(self, kind: Kind, job_id: str) -> tuple[Entry, JobMessage | None]:
        """A job's record and, when the record may not be all (there is none, or it is
        final), its message. With no message found the record is read again: a message
        leaves only after its run's record is stored, so that read sees how it ended."""
        key = kind.status_key(job_id)
        entry = await self.store.get(key)
        if entry.status is not None and not entry.status.final:
            return entry, None
        message = await self.messages.find(kind, job_id)
        if message is None:
            entry = await self.store.get(key)
        return entry, message

    async def current(self, kind: Kind, job_id: str) -> JobStatus | None:
        """Where the job is now: its record, or what its message stands for."""
        entry, message = await self.read(kind, job_id)
        if message is not None and supersedes(message, entry.status):
            return await self.from_message(kind, job_id, message)
        return entry.status

    async def from_message(self, kind: Kind, job_id: str, message: JobMessage) -> JobStatus:
        """The `queued` (or `scheduled`) status of a job known by its message alone."""
        info = await self.kinds.lookup(str(kind))
        return message_status(kind, job_id, message, info.max_attempts if info else 0)


_backends: weakref.WeakKeyDictionary[Client, Backend] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Client, asyncio.Lock] = weakref.WeakKeyDictionary()
