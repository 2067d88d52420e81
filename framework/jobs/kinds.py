"""What each job kind takes, so a bad payload is refused at `enqueue`, not run.

Workers write a record per kind to the `jobs_kinds` bucket when they start: the JSON
schema of the payload (msgspec's, as `$SRV.INFO` shows it) and the kind's settings.
A client reads it once per `CACHE_SECONDS` and validates every payload against it
with fastjsonschema, raising `BadRequest` with the validation message. A kind no
worker has registered yet is accepted as it is; its worker dead-letters a payload it
cannot decode. The worker's decoder stays the authority: the schema catches what a
schema can say (types, required fields, bounds), not every msgspec rule.
"""

from __future__ import annotations

import functools
import json
import time
from datetime import datetime
from typing import Any

import fastjsonschema
import msgspec
from nats.js.errors import KeyNotFoundError

from ..errors import BadRequest
from ..observability.logging import get_logger
from ..transport.codec import DECODE_ERRORS

__all__ = ["KindInfo", "KindRegistry"]

_log = get_logger("framework.jobs")

CACHE_SECONDS = 10.0


class KindInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A kind as its workers declared it (the last worker to start wins)."""

    kind: str
    service_version: str = ""
    takes_payload: bool = True
    payload_schema: Any = None
    result_schema: Any = None
    max_attempts: int = 0
    timeout: float | None = None
    rate_limit: str = ""
    schedule: str = ""
    updated_at: datetime | None = None


_encode = msgspec.json.Encoder().encode
_decode_info = msgspec.json.Decoder(KindInfo).decode


@functools.lru_cache(maxsize=256)
def _validator(schema_text: str) -> Any:
    """A compiled validator per distinct schema (None when it cannot be compiled)."""
    try:
        return fastjsonschema.compile(json.loads(schema_text), use_default=False)
    except (fastjsonschema.JsonSchemaDefinitionException, ValueError) as exc:
        _log.warning("job payload schema not usable, payloads are not checked", error=str(exc))
        return None


_by_schema: dict[int, tuple[Any, Any]] = {}  # id(schema) -> (schema, validator)


def _validator_of(schema: Any) -> Any:
    """`_validator` of a schema object, remembered by identity: a kind's record is
    cached, so its schema is the same object for every payload checked against it
    (kept here with its validator, so its id is not reused meanwhile)."""
    found = _by_schema.get(id(schema))
    if found is not None and found[0] is schema:
        return found[1]
    if len(_by_schema) >= 256:
        _by_schema.clear()
    check = _validator(json.dumps(schema, sort_keys=True))
    _by_schema[id(schema)] = (schema, check)
    return check


def validate(info: KindInfo, body: bytes) -> None:
    """Raise `BadRequest` when `body` cannot be the payload of `info.kind`."""
    if not info.takes_payload or info.payload_schema in (None, {}):
        return
    try:
        value = msgspec.json.decode(body) if body else None
    except DECODE_ERRORS as exc:
        raise BadRequest(f"payload of {info.kind} is not JSON: {exc}") from None
    check = _validator_of(info.payload_schema)
    if check is None:
        return
    try:
        check(value)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise BadRequest(f"invalid payload for {info.kind}: {exc.message}") from None


class KindRegistry:
    """The `jobs_kinds` bucket, with a short-lived cache of what was read."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv
        self._cache: dict[str, tuple[float, KindInfo | None]] = {}

    async def register(self, info: KindInfo) -> None:
        """Store a kind's record (a worker does at start; the last one wins)."""
        await self._kv.put(info.kind, _encode(info))
        self._cache[info.kind] = (time.monotonic(), info)

    async def lookup(self, kind: str) -> KindInfo | None:
        """A kind's record, or None if no worker registered it (cached briefly)."""
        cached = self._cache.get(kind)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        try:
            entry = await self._kv.get(kind)
            info: KindInfo | None = _decode_info(entry.value) if entry.value else None
        except KeyNotFoundError:
            info = None
        except msgspec.MsgspecError:
            info = None  # written by a newer or foreign writer: do not guess
        self._cache[kind] = (time.monotonic(), info)
        return info

    async def all(self) -> list[KindInfo]:
        """Every registered kind (for tools: the CLI, a dashboard)."""
        try:
            keys = await self._kv.keys()
        except Exception:  # NoKeysError: none registered
            return []
        found = [await self.lookup(key) for key in sorted(keys)]
        return [info for info in found if info is not None]
