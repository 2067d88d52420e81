"""Effectively-once handling: JetStream key-value buckets of what was already handled.

An event's id is marked processed after its handler succeeds and before it is acked,
so a redelivery (a crash between handling and ack, or a duplicate published outside
the stream's dedupe window) is acked without running the handler again. The window
that remains: a crash after the handler's side effect but before the marker is
stored runs the handler again on redelivery. Handlers with external side effects
close it with a business key of their own (e.g. charge once per order id).

`ProcessedIds` talks to the bucket's stream directly, by the documented KV
conventions (ADR-8: stream `KV_<bucket>`, subject `$KV.<bucket>.<key>`, a delete or
purge is a message with a `KV-Operation` header) and the Direct Get API (ADR-31), over
one wildcard inbox subscription per connection (`framework.transport.mux`). A subscriber asks
about a pulled batch with `seen_among` (one batched `multi_last` direct get; `seen`
calls of one event-loop iteration are batched the same way) and marks its successes
with `mark_all`: one fast-ingest batch where the bucket allows it, else one JetStream
publish per marker, each with its own PubAck. Either way `mark_all` returns once the
markers are stored (or says which were not), so the caller acks only what is stored.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import re
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js import api
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError

from ..streams import default_replicas
from ..transport.mux import Mux, Unsupported
from ..transport.wire_errors import pub_ack_error, status_error

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["DEFAULT_TTL", "ProcessedIds", "ResponseCache", "kv_key", "open_bucket"]

DEFAULT_TTL = 7 * 24 * 3600.0  # as long as the default stream keeps events
REQUEST_TIMEOUT = 5.0  # what nats-py's JetStream calls wait by default
# A fast-ingest batch not answered within this is written again one marker at a time
# (markers are idempotent, so a batch that was stored after all costs nothing): a lost
# batch reply must not hold a whole batch of acks for REQUEST_TIMEOUT.
FAST_BATCH_TIMEOUT = 1.0
BATCH_KEYS = 256  # subjects per multi_last request (the server allows up to 1024)
_JS_API = "$JS.API"  # the default JetStream API prefix, the one `Client.js` uses
_KV_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+$")

# Headers of direct get replies (ADR-31) and KV entries (ADR-8, ADR-48).
_STATUS = "Status"
_DESCRIPTION = "Description"
_SUBJECT = "Nats-Subject"
_NUM_PENDING = "Nats-Num-Pending"
_UP_TO_SEQ = "Nats-UpTo-Sequence"
_KV_OP = "KV-Operation"
_MARKER = "Nats-Marker-Reason"  # a delete marker the server wrote (limit markers)
_DELETED = frozenset({"DEL", "PURGE"})


def kv_key(raw: str) -> str:
    """KV keys allow fewer characters than ids do; hash the ones that do not fit."""
    if len(raw) <= 128 and _KV_KEY.match(raw):
        return raw
    return "h_" + hashlib.sha256(raw.encode()).hexdigest()[:40]


async def open_bucket(
    client: Client,
    bucket: str,
    ttl: float,
    description: str,
    *,
    direct: bool = True,
    fast_ingest: bool = False,
) -> Any:
    """The bucket, created if missing: Direct Get allowed unless `direct=False`, fast
    ingest (`allow_batched`, nats-server 2.14+) allowed if `fast_ingest`.

    An existing bucket is used as it is: its configuration is not changed. The stream
    is declared here, by the KV conventions (ADR-8) nats-py's `create_key_value` also
    follows, because that call cannot allow fast ingest.
    """
    js = client.js
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        pass
    config = api.StreamConfig(
        name=f"KV_{bucket}",
        description=description,
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=direct,
        allow_rollup_hdrs=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, ttl),
        max_age=ttl,
        max_msgs_per_subject=1,  # history 1: the latest value only
        num_replicas=default_replicas(),
        storage=api.StorageType.FILE,
        allow_batched=fast_ingest or None,
    )
    try:
        await js.add_stream(config)
    except APIError:
        pass  # a replica created it first; if not, key_value says what is wrong
    return await js.key_value(bucket)


def _fail(futures: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
    """Every future not yet resolved gets the error (its own copy), or is cancelled."""
    for future in futures:
        if not future.done():
            if isinstance(exc, Exception):
                future.set_exception(_fresh(exc))
            else:
                future.cancel()


def _live(headers: dict[str, str]) -> bool:
    """A stored value, not a delete or purge marker."""
    return headers.get(_KV_OP) not in _DELETED and _MARKER not in headers


def _fresh(exc: BaseException) -> BaseException:
    """A copy without the traceback, so callers sharing one failure raise their own."""
    try:
        return copy.copy(exc).with_traceback(None)
    except Exception:
        return exc


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
    """Event ids one (service, subscriber) has handled, kept for `ttl` seconds.

    `seen` calls of one event-loop iteration share one batched direct get (up to
    `BATCH_KEYS` keys a request); a server older than 2.11 refuses the batch and is
    then asked key by key (`batched` turns False). A bucket created before Direct Get
    was allowed on it (`direct` is False) is read through the KV API as before. A
    failure (a timeout after `timeout` seconds, no responders, an error status) raises
    to every caller of the batch, each its own copy of the exception.
    """

    timeout = REQUEST_TIMEOUT

    def __init__(
        self, kv: Any, bucket: str | None = None, mux: Mux | None = None, direct: bool = False
    ) -> None:
        super().__init__(kv)
        self._mux = mux
        self._pre = f"$KV.{bucket}."
        self._direct_get = f"{_JS_API}.DIRECT.GET.KV_{bucket}"
        self.direct = direct and mux is not None and bucket is not None
        self.batched = True  # multi_last until the server refuses it
        self.fast = False  # marks stored as fast-ingest batches (set by `open`)
        self.fallbacks = 0  # fast batches that failed and were written one by one
        self._queue: list[tuple[str, asyncio.Future[bool]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, client: Client, service: str, subscriber: str, ttl: float = DEFAULT_TTL
    ) -> ProcessedIds:
        """The subscriber's bucket `processed_<service>_<subscriber>`, created if missing."""
        bucket = f"processed_{service}_{subscriber}"
        kv = await open_bucket(
            client, bucket, ttl, f"event ids handled by {service}.{subscriber}", fast_ingest=True
        )
        status = await kv.status()
        direct = bool(status.stream_info.config.allow_direct)
        processed = cls(kv, bucket, await client.mux(), direct)
        processed.fast = bool(status.stream_info.config.allow_batched)
        return processed

    async def seen(self, event_id: str) -> bool:
        if not self.direct:
            return await self._get(event_id) is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queue.append((self._pre + kv_key(event_id), future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    async def mark(self, event_id: str) -> None:
        """Mark one id (a subscriber marks a whole batch with `mark_all`)."""
        error = (await self.mark_all([event_id]))[0]
        if error is not None:
            raise error

    async def _store_subjects(self, subjects: list[str]) -> list[Exception | None]:
        """A marker on each subject: None where it is stored, else why not. Raises
        when the server did not answer at all."""
        assert self._mux is not None
        if self.fast:
            try:
                await self._mux.fast_batch(subjects, b"1", min(self.timeout, FAST_BATCH_TIMEOUT))
                return [None] * len(subjects)
            except Unsupported:
                self.fast = False  # for good: this server or stream does not do fast ingest
            except Exception:
                self.fallbacks += 1  # one by one below: each gets its own PubAck and error
        replies = await self._mux.request_each([(s, b"1") for s in subjects], self.timeout)
        return [pub_ack_error(reply) for reply in replies]

    # For a whole pulled batch at once (no future per id) -------------------------

    async def seen_among(self, event_ids: Sequence[str]) -> set[str]:
        """The ids of `event_ids` already marked. Raises when the server cannot say."""
        if not self.direct:
            return {i for i in event_ids if await self._get(i) is not None}
        by_subject = {self._pre + kv_key(i): i for i in event_ids}
        subjects = list(by_subject)
        found: set[str] = set()
        for start in range(0, len(subjects), BATCH_KEYS):
            found |= await self._found(subjects[start : start + BATCH_KEYS])
        return {by_subject[s] for s in found}

    async def mark_all(self, event_ids: Sequence[str]) -> list[Exception | None]:
        """Mark each id: None where the marker is stored, else why it is not."""
        results: list[Exception | None] = []
        if self._mux is None:
            for event_id in event_ids:
                try:
                    await self._put(event_id, b"1")
                    results.append(None)
                except Exception as exc:
                    results.append(exc)
            return results
        subjects = [self._pre + kv_key(i) for i in event_ids]
        for start in range(0, len(subjects), BATCH_KEYS):
            chunk = subjects[start : start + BATCH_KEYS]
            try:
                results += await self._store_subjects(chunk)
            except Exception as exc:
                results += [exc] * len(chunk)
        return results

    # Batched lookups -------------------------------------------------------------

    def _flush(self) -> None:
        """Split what `seen` queued in this loop iteration into batches and ask for them."""
        self._scheduled = False
        queue, self._queue = self._queue, []
        batch: dict[str, list[asyncio.Future[bool]]] = {}
        for subject, future in queue:
            if future.done():
                continue  # its caller was cancelled
            waiting = batch.get(subject)
            if waiting is not None:
                waiting.append(future)  # the same id twice in one batch
                continue
            if len(batch) == BATCH_KEYS:
                self._spawn(self._lookup(batch))
                batch = {}
            batch[subject] = [future]
        if batch:
            self._spawn(self._lookup(batch))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, batch: dict[str, list[asyncio.Future[bool]]]) -> None:
        """Resolve every future of the batch exactly once: a result or the error."""
        try:
            found = await self._found(list(batch))
        except BaseException as exc:
            _fail([f for futures in batch.values() for f in futures], exc)
            if not isinstance(exc, Exception):
                raise
            return
        for subject, futures in batch.items():
            result = subject in found
            for future in futures:
                if not future.done():
                    future.set_result(result)

    async def _found(self, subjects: list[str]) -> set[str]:
        """Those of `subjects` whose last message is a stored value."""
        if self.batched:
            try:
                return await self._found_batched(subjects)
            except Unsupported:
                self.batched = False  # for good: the server will not learn it
        return await self._found_each(subjects)

    async def _found_batched(self, subjects: list[str]) -> set[str]:
        assert self._mux is not None
        found: set[str] = set()
        wanted = set(subjects)
        remaining = subjects
        request: dict[str, Any] = {"multi_last": remaining}
        while True:
            body = msgspec.json.encode(request)
            replies = await self._mux.request_many(self._direct_get, body, self.timeout)
            returned: set[str] = set()
            for msg in replies:
                headers = msg.headers
                if not headers:
                    raise Unsupported(f"reply without headers: {msg.data[:200]!r}")
                status = headers.get(_STATUS)
                if status is None:
                    if _NUM_PENDING not in headers:
                        raise Unsupported("a single reply to a batched request")
                    subject = headers.get(_SUBJECT, "")
                    if subject in wanted:
                        returned.add(subject)
                        if _live(headers):
                            found.add(subject)
                    continue
                if status == "404":  # none of the subjects has a message
                    return found
                if status == "204":  # EOB: more pending when the server cut the batch
                    if headers.get(_NUM_PENDING, "0") in ("", "0"):
                        return found
                    if not returned:
                        raise APIError(description="direct get batch made no progress")
                    remaining = [s for s in remaining if s not in returned]
                    request = {"multi_last": remaining}
                    if up_to := headers.get(_UP_TO_SEQ, ""):
                        request["up_to_seq"] = int(up_to)
                    break
                if status.startswith("4"):  # 408 Empty Request: `multi_last` unknown
                    raise Unsupported(f"{status} {headers.get(_DESCRIPTION, '')}")
                raise status_error(msg)  # 503 no responders and the like: an error
            else:
                raise APIError(description="direct get batch ended without EOB")

    async def _found_each(self, subjects: list[str]) -> set[str]:
        assert self._mux is not None
        requests = [(f"{self._direct_get}.{subject}", b"") for subject in subjects]
        replies = await self._mux.request_each(requests, self.timeout)
        found: set[str] = set()
        for subject, msg in zip(subjects, replies, strict=True):
            headers = msg.headers or {}
            status = headers.get(_STATUS)
            if status == "404":
                continue
            if status is not None:
                raise status_error(msg)
            if headers.get(_SUBJECT) == subject and _live(headers):
                found.add(subject)
        return found


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
