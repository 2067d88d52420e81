"""The jobs machinery of one connection: stream checked, buckets opened, once.

A `Client` is shared by many tasks; the first one that enqueues (or a worker that
starts) declares the stream and opens the buckets, the others wait for it and reuse
what it opened. Kept beside the client, not in it, so `client` stays free of jobs.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

from .declare import ensure_jobs_stream, open_kinds_bucket, open_status_bucket
from .kinds import KindRegistry
from .store import StatusStore

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Backend"]


class Backend:
    """Status store and kind registry of one client."""

    def __init__(self, client: Client, store: StatusStore, kinds: KindRegistry) -> None:
        self.client = client
        self.store = store
        self.kinds = kinds

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
                store = StatusStore(await client.mux(), await open_status_bucket(client))
                backend = cls(client, store, KindRegistry(await open_kinds_bucket(client)))
                _backends[client] = backend
        return backend


_backends: weakref.WeakKeyDictionary[Client, Backend] = weakref.WeakKeyDictionary()
_locks: weakref.WeakKeyDictionary[Client, asyncio.Lock] = weakref.WeakKeyDictionary()
