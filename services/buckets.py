"""State of the sample services: JetStream key-value buckets, opened once per connection.

Values are JSON (msgspec). Writers that must not lose a concurrent update use the
entry's revision: `kv.create` (only if absent) and `kv.update(..., last=revision)`
(only if unchanged) fail instead of overwriting another replica's write.

A change that spans several keys (an order's reservation and the stock of each of its
SKUs) is written with `write_all`: one ADR-50 atomic batch in which every key is
guarded by the revision it was read at, so either every key changes or none does.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError

from framework import Client, NotFound, open_bucket

T = TypeVar("T")
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's err_codes of a failed revision check
MAX_BATCH = 1000  # the server's limit of messages in one atomic batch


class Conflict(Exception):
    """A guarded write lost to a concurrent one: nothing was written; read again."""


class Bucket:
    """A named bucket; `await bucket.open(client)` creates it on first use.

    `atomic=True` allows ADR-50 atomic batches on its stream (`write_all`).
    """

    def __init__(
        self, name: str, description: str, ttl: float = 0.0, *, atomic: bool = False
    ) -> None:
        self.name = name
        self.description = description
        self.ttl = ttl  # seconds; 0 keeps entries forever
        self.atomic = atomic
        self._open: weakref.WeakKeyDictionary[Client, Any] = weakref.WeakKeyDictionary()

    async def open(self, client: Client) -> Any:
        kv = self._open.get(client)
        if kv is None:
            kv = await open_bucket(client, self.name, self.ttl, self.description)
            if self.atomic:
                await _allow_atomic(client, f"KV_{self.name}")
            self._open[client] = kv
        return kv


async def _allow_atomic(client: Client, stream: str) -> None:
    info = await client.js.stream_info(stream)
    if not info.config.allow_atomic:
        config = info.config
        config.allow_atomic = True
        await client.js.update_stream(config)


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


async def keys_matching(client: Client, bucket: Bucket, pattern: str) -> list[str]:
    """Keys matching a subject pattern (`sku.*`), as the bucket's stream lists its
    subjects at one moment. A watch (what nats-py's `keys` does) can miss a key that is
    written while it runs: the key's old message is gone and its new one comes after the
    watch's "all initial values delivered" mark."""
    prefix = f"$KV.{bucket.name}."
    info = await client.js.stream_info(f"KV_{bucket.name}", subjects_filter=prefix + pattern)
    return [subject[len(prefix) :] for subject in info.state.subjects or {}]


class Write(NamedTuple):
    """One key's new value, written only if the key is still at `revision` (0: absent)."""

    key: str
    value: Any  # encoded as JSON
    revision: int


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, Any] | None = None


async def write_all(client: Client, bucket: Bucket, writes: Sequence[Write]) -> int:
    """Every write or none (one atomic batch); `Conflict` if any key changed meanwhile.

    Returns the stream sequence of the last write. The bucket must be `atomic`.
    """
    if not 0 < len(writes) <= MAX_BATCH:
        raise ValueError(f"an atomic batch holds 1 to {MAX_BATCH} writes, not {len(writes)}")
    nc = client.nc
    batch_id = uuid.uuid4().hex
    reply = None
    for number, write in enumerate(writes, 1):
        headers = {
            "Nats-Batch-Id": batch_id,
            "Nats-Batch-Sequence": str(number),
            "Nats-Expected-Last-Subject-Sequence": str(write.revision),
        }
        subject, data = f"$KV.{bucket.name}.{write.key}", msgspec.json.encode(write.value)
        if number < len(writes):
            await nc.publish(subject, data, headers=headers)
        else:
            headers["Nats-Batch-Commit"] = "1"
            reply = await nc.request(subject, data, headers=headers, timeout=5.0)
    assert reply is not None
    ack = msgspec.json.decode(reply.data or b"{}", type=_PubAck)
    if ack.error is not None:
        if ack.error.get("err_code") in WRONG_LAST_SEQUENCE:
            raise Conflict(f"{bucket.name}: {ack.error.get('description')}")
        raise RuntimeError(f"atomic write to {bucket.name} refused: {ack.error}")
    if not ack.seq:
        raise RuntimeError(f"atomic write to {bucket.name}: no acknowledgement ({reply.headers})")
    return ack.seq
