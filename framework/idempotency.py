"""Effectively-once handling: JetStream key-value buckets of what was already handled.

An event's id is marked processed after its handler succeeds and before it is acked,
so a redelivery (a crash between handling and ack, or a duplicate published outside
the stream's dedupe window) is acked without running the handler again. The window
that remains: a crash after the handler's side effect but before the marker is
stored runs the handler again on redelivery. Handlers with external side effects
close it with a business key of their own (e.g. charge once per order id).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from nats.js import api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from .streams import default_replicas

if TYPE_CHECKING:
    from .client import Client

__all__ = ["DEFAULT_TTL", "ProcessedIds", "ResponseCache", "kv_key", "open_bucket"]

DEFAULT_TTL = 7 * 24 * 3600.0  # as long as the default stream keeps events
_KV_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+$")


def kv_key(raw: str) -> str:
    """KV keys allow fewer characters than ids do; hash the ones that do not fit."""
    if len(raw) <= 128 and _KV_KEY.match(raw):
        return raw
    return "h_" + hashlib.sha256(raw.encode()).hexdigest()[:40]


async def open_bucket(client: Client, bucket: str, ttl: float, description: str) -> Any:
    js = client.js
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    config = api.KeyValueConfig(
        bucket=bucket,
        description=description,
        ttl=ttl,
        history=1,
        replicas=default_replicas(),
        storage=api.StorageType.FILE,
    )
    try:
        return await js.create_key_value(config)
    except Exception:
        return await js.key_value(bucket)  # a replica created it first


class _Bucket:
    def __init__(self, kv: Any) -> None:
        self._kv = kv

    async def _get(self, key: str) -> bytes | None:
        try:
            entry = await self._kv.get(kv_key(key))
        except KeyNotFoundError:
            return None
        value: bytes | None = entry.value
        return value if value is not None else b""

    async def _put(self, key: str, value: bytes) -> None:
        await self._kv.put(kv_key(key), value)


class ProcessedIds(_Bucket):
    """Event ids one (service, handler) has handled, kept for `ttl` seconds."""

    @classmethod
    async def open(
        cls, client: Client, service: str, handler: str, ttl: float = DEFAULT_TTL
    ) -> ProcessedIds:
        bucket = f"processed_{service}_{handler}"
        return cls(
            await open_bucket(client, bucket, ttl, f"event ids handled by {service}.{handler}")
        )

    async def seen(self, event_id: str) -> bool:
        return await self._get(event_id) is not None

    async def mark(self, event_id: str) -> None:
        await self._put(event_id, b"1")


class ResponseCache(_Bucket):
    """Replies of an idempotent RPC endpoint by `Idempotency-Key`."""

    @classmethod
    async def open(
        cls, client: Client, service: str, endpoint: str, ttl: float = 24 * 3600.0
    ) -> ResponseCache:
        bucket = f"responses_{service}_{endpoint}"
        return cls(await open_bucket(client, bucket, ttl, f"replies of {service}.{endpoint}"))

    async def get(self, key: str) -> bytes | None:
        return await self._get(key)

    async def put(self, key: str, body: bytes) -> None:
        await self._put(key, body)
