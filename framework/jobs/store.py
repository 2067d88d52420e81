"""Status records in the `jobs` bucket: read, compare-and-set, watch, list.

Reads are Direct Gets and writes are JetStream publishes with
`Nats-Expected-Last-Subject-Sequence`, both over the connection's one inbox
subscription (`transport.mux`), by the documented KV conventions (ADR-8): stream
`KV_jobs`, subject `$KV.jobs.<key>`. Every write names the revision it replaces, so
two writers (a worker finishing, a client cancelling) never overwrite each other
unseen: the loser gets `Conflict` and reads again. A job queued without a record yet
is known by its message in `JOBS` (`messages`): listings include it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import msgspec
from nats.js.errors import APIError

from ..transport.mux import Mux, status_error
from .messages import JOB_ID, JobMessages, message_status, supersedes
from .options import STATUS_BUCKET, Kind, id_token
from .status import JobStatus, decode_status, encode_status

__all__ = ["Conflict", "Entry", "StatusStore"]

REQUEST_TIMEOUT = 5.0
_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = (10071, 10164)
_DELETED = frozenset({"DEL", "PURGE"})


class Conflict(Exception):
    """The record changed since it was read: read it again and decide again."""


class Entry(NamedTuple):
    """A record and its revision; `status` is None when there is none (`revision` is
    then 0, or the sequence of the delete marker a new record must replace)."""

    status: JobStatus | None
    revision: int


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


def _written(key: str, expected: int, reply: Any) -> int | Exception:
    """A write's new revision from its PubAck, or why it was not stored."""
    if not reply.data:
        return status_error(reply)
    ack = _decode_ack(reply.data)
    if ack.error is None:
        return ack.seq
    code = ack.error.get("err_code")
    if code in _WRONG_LAST_SEQUENCE:
        return Conflict(f"job record {key} changed (expected revision {expected})")
    return APIError(
        code=ack.error.get("code"), description=ack.error.get("description"), err_code=code
    )


class StatusStore:
    """The `jobs` bucket of one connection."""

    timeout = REQUEST_TIMEOUT

    def __init__(
        self, mux: Mux, kv: Any, messages: JobMessages, bucket: str = STATUS_BUCKET
    ) -> None:
        self._mux = mux
        self.kv = kv
        self.messages = messages
        self._put_prefix = f"$KV.{bucket}."
        self._get_prefix = f"$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}."

    async def get(self, key: str) -> Entry:
        """The record and its revision (Direct Get of the key's last message)."""
        reply = await self._mux.request(self._get_prefix + key, b"", self.timeout)
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404":
            return Entry(None, 0)
        if status is not None:
            raise status_error(reply)
        revision = int(headers.get("Nats-Sequence", "0") or 0)
        if headers.get("KV-Operation") in _DELETED or "Nats-Marker-Reason" in headers:
            return Entry(None, revision)
        return Entry(decode_status(reply.data), revision)

    async def put(
        self, key: str, status: JobStatus, expected: int, data: bytes | None = None
    ) -> int:
        """Write `status` (already encoded: `data`) if the record is still at revision
        `expected` (0: no record); its new revision, or `Conflict`."""
        headers = {_EXPECTED: str(expected)}
        body = data if data is not None else encode_status(status)
        reply = await self._mux.request(self._put_prefix + key, body, self.timeout, headers)
        result = _written(key, expected, reply)
        if isinstance(result, Exception):
            raise result
        return result

    async def put_all(self, writes: Sequence[tuple[str, bytes, int]]) -> list[int | Exception]:
        """Several compare-and-set writes of encoded records (key, data, expected
        revision), sent at once: each one's new revision, or why it is not stored
        (`Conflict`, or the error: then it may or may not be)."""
        requests = [(self._put_prefix + key, data) for key, data, _ in writes]
        headers: list[dict[str, str] | None] = [{_EXPECTED: str(e)} for _, _, e in writes]
        try:
            replies = await self._mux.request_each(requests, self.timeout, headers)
        except Exception as exc:
            return [exc for _ in writes]
        return [
            _written(key, expected, reply)
            for (key, _, expected), reply in zip(writes, replies, strict=True)
        ]

    async def delete(self, key: str, expected: int) -> None:
        """Remove the record if it is still at revision `expected`."""
        headers = {"KV-Operation": "DEL", _EXPECTED: str(expected)}
        await self._mux.request(self._put_prefix + key, b"", self.timeout, headers)

    async def create(self, key: str, status: JobStatus) -> int:
        """Write a new record; `Conflict` when one exists (a delete marker does not count)."""
        try:
            return await self.put(key, status, 0)
        except Conflict:
            entry = await self.get(key)
            if entry.status is not None or entry.revision == 0:
                raise
            return await self.put(key, status, entry.revision)

    async def watch(self, key: str) -> AsyncIterator[Entry]:
        """The record as the watch began (`Entry(None, 0)` when there is none), then
        every change; ends after a deletion.

        A key watch (an ordered consumer of the bucket's stream): the server pushes
        each change, nothing polls.
        """
        watcher = await self.kv.watch(key)
        try:
            initial = True
            async for entry in watcher:
                if entry is None:  # the end of what was stored when the watch began
                    if initial:
                        initial = False
                        yield Entry(None, 0)
                    continue
                deleted = entry.operation is not None or not entry.value
                yield Entry(None if deleted else decode_status(entry.value), entry.revision or 0)
                if deleted and not initial:
                    return  # deleted or purged (retention ran out)
                initial = False
        finally:
            await watcher.stop()

    async def scan(self, key_filter: str) -> list[JobStatus]:
        """Every job whose key matches `key_filter` (`<service>.<name>.*` or `*.*.*`), as
        stored now: the records, and jobs queued without one yet (their messages)."""
        watcher = await self.kv.watch(key_filter, ignore_deletes=True)
        found: dict[str, JobStatus] = {}
        try:
            async for entry in watcher:
                if entry is None:
                    break
                if entry.value:
                    found[entry.key] = decode_status(entry.value)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()
        service, name, _ = key_filter.split(".", 2)
        kind = Kind.parse(f"{service}.{name}") if "*" not in (service, name) else None
        for message in await self.messages.scan(kind):
            _, service, name, _, token = message.subject.split(".", 4)
            job_kind = Kind.parse(f"{service}.{name}")
            job_id = message.headers.get(JOB_ID) or token
            key = f"{service}.{name}.{id_token(job_id)}"
            if supersedes(message, found.get(key)):
                found[key] = message_status(job_kind, job_id, message)
        return list(found.values())
