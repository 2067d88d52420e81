"""State of the sample services: JetStream key-value buckets, opened once per connection.

Values are JSON (msgspec). Writers that must not lose a concurrent update use the
entry's revision: `kv.create` (only if absent) and `kv.update(..., last=revision)`
(only if unchanged) fail instead of overwriting another replica's write.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError

from framework import Client, NotFound, open_bucket

T = TypeVar("T")


class Bucket:
    """A named bucket; `await bucket.open(client)` creates it on first use."""

    def __init__(self, name: str, description: str, ttl: float = 0.0) -> None:
        self.name = name
        self.description = description
        self.ttl = ttl  # seconds; 0 keeps entries forever
        self._open: weakref.WeakKeyDictionary[Client, Any] = weakref.WeakKeyDictionary()

    async def open(self, client: Client) -> Any:
        kv = self._open.get(client)
        if kv is None:
            kv = await open_bucket(client, self.name, self.ttl, self.description)
            self._open[client] = kv
        return kv


async def read(kv: Any, key: str, tp: type[T]) -> tuple[T, int] | None:
    """The value and its revision, or None when the key does not exist."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return msgspec.json.decode(entry.value, type=tp), int(entry.revision)


async def read_existing(kv: Any, key: str, tp: type[T], missing: str) -> tuple[T, int]:
    """The value and its revision; `NotFound(missing)` (404 to a caller) when absent."""
    found = await read(kv, key, tp)
    if found is None:
        raise NotFound(missing)
    return found
