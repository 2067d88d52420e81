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
one wildcard inbox subscription per connection. `seen` calls made in one event-loop
iteration (a pulled batch handed to the workers) are answered by one batched
`multi_last` direct get; `mark` is a JetStream publish whose own PubAck is awaited, so
the marker is stored before the caller acks (the marks of one iteration are published
together and share one timeout).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import re
import weakref
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError

from .streams import default_replicas

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

    from .client import Client

__all__ = ["DEFAULT_TTL", "ProcessedIds", "ResponseCache", "kv_key", "open_bucket"]

DEFAULT_TTL = 7 * 24 * 3600.0  # as long as the default stream keeps events
REQUEST_TIMEOUT = 5.0  # what nats-py's JetStream calls wait by default
BATCH_KEYS = 256  # subjects per multi_last request (the server allows up to 1024)
_JS_API = "$JS.API"  # the default JetStream API prefix, the one `Client.js` uses
# Fast-ingest batches (nats-server 2.14+): the reply subject carries the protocol,
# `<inbox>.<flow>.<gap>.<batch seq>.<operation>.$FI`.
_FAST_FLOW = 1000  # ack cadence asked for: more than a batch holds, so only its ends
_FI_START, _FI_ADD, _FI_COMMIT = 0, 1, 2
_FAST_UNSUPPORTED = frozenset({10205, 10206})  # batch publish disabled, invalid pattern
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
    client: Client, bucket: str, ttl: float, description: str, *, direct: bool = True
) -> Any:
    """The bucket, created (with Direct Get allowed unless `direct=False`) if missing.

    An existing bucket is used as it is: its configuration is not changed.
    """
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
        direct=direct,
    )
    try:
        return await js.create_key_value(config)
    except Exception:
        return await js.key_value(bucket)  # a replica created it first


class _Unsupported(Exception):
    """The server refused a batched (`multi_last`) direct get: older than 2.11."""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    error: dict[str, Any] | None = None


_decode_pub_ack = msgspec.json.Decoder(_PubAck).decode


class _FastBatch:
    """Collects the frames of one fast-ingest batch; resolves on the terminal one."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _Mux:
    """Requests over one wildcard inbox subscription (`<inbox>.>`) of a connection.

    Each request gets a counter token (the first token after the prefix; a fast-ingest
    batch adds tokens of its own after it); the subscription's callback resolves the
    request's future. Entries are removed when the request returns, fails or times out,
    so nothing grows while the server does not answer.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._count = 0
        # token -> (future, replies collected so far; None for a single reply; or the
        # fast-ingest batch whose terminal frame is awaited)
        self._pending: dict[str, tuple[asyncio.Future[Any], list[Msg] | _FastBatch | None]] = {}
        self.requests = 0  # messages sent, for tests and diagnostics
        self.replies = 0  # messages received, likewise

    async def ready(self) -> None:
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await self._nc.subscribe(self._prefix + ">", cb=self._on_reply)

    def _register(
        self, many: bool, batch: _FastBatch | None = None
    ) -> tuple[str, asyncio.Future[Any]]:
        self._count += 1
        token = format(self._count, "x")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[token] = (future, batch if batch is not None else [] if many else None)
        return token, future

    async def _publish(self, subject: str, data: bytes, token: str) -> None:
        self.requests += 1
        await self._nc.publish(subject, data, reply=self._prefix + token)

    async def request(self, subject: str, data: bytes, timeout: float) -> Msg:
        """One request, one reply."""
        token, future = self._register(False)
        try:
            await self._publish(subject, data, token)
            async with asyncio.timeout(timeout):
                reply: Msg = await future
                return reply
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            del self._pending[token]

    async def request_each(
        self, requests: Sequence[tuple[str, bytes]], timeout: float
    ) -> list[Msg]:
        """Several requests sent at once, one reply each, in the order of `requests`."""
        tokens: list[str] = []
        futures: list[asyncio.Future[Any]] = []
        try:
            for subject, data in requests:
                token, future = self._register(False)
                tokens.append(token)
                futures.append(future)
                await self._publish(subject, data, token)
            async with asyncio.timeout(timeout):
                return [await future for future in futures]
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            for token in tokens:
                del self._pending[token]
            for future in futures:
                future.cancel()  # a no-op on those resolved; retrieves nothing

    async def request_many(self, subject: str, data: bytes, timeout: float) -> list[Msg]:
        """A direct get answered by several messages, up to a status (`204 EOB`, an
        error) or a message without `Nats-Num-Pending` (a server that does not batch)."""
        token, future = self._register(True)
        try:
            await self._publish(subject, data, token)
            async with asyncio.timeout(timeout):
                replies: list[Msg] = await future
                return replies
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            del self._pending[token]

    async def fast_batch(self, subjects: Sequence[str], data: bytes, timeout: float) -> None:
        """Store one message on each subject as one fast-ingest batch (nats-server 2.14+,
        `allow_batched` on the stream): the server answers the batch's first message and
        its commit, not every message. Returns once all of them are stored; raises
        `_Unsupported` when the server or stream does not do fast ingest, `APIError` when
        a message was refused or the batch was cut short.
        """
        batch = _FastBatch(len(subjects))
        token, future = self._register(False, batch)
        prefix = f"{self._prefix}{token}.{_FAST_FLOW}.fail."
        last = len(subjects)
        try:
            for seq, subject in enumerate(subjects, 1):
                op = _FI_COMMIT if seq == last else _FI_START if seq == 1 else _FI_ADD
                self.requests += 1
                await self._nc.publish(subject, data, reply=f"{prefix}{seq}.{op}.$FI")
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            del self._pending[token]

    async def _on_reply(self, msg: Msg) -> None:
        self.replies += 1
        rest = msg.subject[self._cut :]
        dot = rest.find(".")
        waiter = self._pending.get(rest if dot < 0 else rest[:dot])
        if waiter is None:
            return  # late (timed out) or unknown
        future, replies = waiter
        if future.done():
            return
        if replies is None:
            future.set_result(msg)
            return
        if isinstance(replies, _FastBatch):
            _settle_fast_batch(future, replies, msg)
            return
        replies.append(msg)
        headers = msg.headers
        if not headers or _STATUS in headers or _NUM_PENDING not in headers:
            future.set_result(replies)


class _BatchFrame(msgspec.Struct):
    """A frame on a fast-ingest batch's inbox: a flow ack, gap or error (`type`), or
    the terminal batch ack (`stream`, `batch`, `count`) or failure (`error`)."""

    type: str = ""
    stream: str = ""
    batch: str = ""
    count: int = 0
    error: dict[str, Any] | None = None


_decode_batch_frame = msgspec.json.Decoder(_BatchFrame).decode


def _settle_fast_batch(future: asyncio.Future[Any], batch: _FastBatch, msg: Msg) -> None:
    if not msg.data:
        future.set_exception(_status_error(msg))  # 503: the stream is gone
        return
    try:
        frame = _decode_batch_frame(msg.data)
    except msgspec.MsgspecError:
        future.set_exception(APIError(description=f"invalid batch ack: {msg.data[:200]!r}"))
        return
    if frame.type == "ack":
        return  # flow control: the commit's ack is what counts
    if frame.error is not None:
        err = frame.error
        if err.get("err_code") in _FAST_UNSUPPORTED:
            future.set_exception(_Unsupported(err.get("description", "fast batch refused")))
            return
        future.set_exception(
            APIError(
                code=err.get("code"),
                description=err.get("description"),
                err_code=err.get("err_code"),
            )
        )
        return
    if frame.type:  # "gap" or "err" without details: the batch is not whole
        future.set_exception(APIError(description=f"fast batch {frame.type}: {msg.data!r}"))
        return
    if not frame.batch:  # a plain PubAck: the server does not know fast ingest
        future.set_exception(_Unsupported("the server answered a fast batch message alone"))
        return
    if frame.count != batch.size:
        future.set_exception(
            APIError(description=f"fast batch stored {frame.count} of {batch.size} messages")
        )
        return
    future.set_result(None)


# One multiplexer per client: one inbox subscription however many buckets are open.
_muxes: weakref.WeakKeyDictionary[Client, _Mux] = weakref.WeakKeyDictionary()


async def _mux_of(client: Client) -> _Mux:
    mux = _muxes.get(client)
    if mux is None:
        mux = _muxes[client] = _Mux(client.nc)
    await mux.ready()
    return mux


async def _allow_fast_ingest(client: Client, stream: str) -> bool:
    """Fast ingest (`allow_batched`, nats-server 2.14+) on one of our own buckets'
    streams, switched on if it is off. False where the server does not know it."""
    nc = client.nc
    try:
        reply = await nc.request(f"{_JS_API}.STREAM.INFO.{stream}", b"", timeout=REQUEST_TIMEOUT)
        config = msgspec.json.decode(reply.data).get("config") or {}
        if config.get("allow_batched"):
            return True
        config["allow_batched"] = True
        body = msgspec.json.encode(config)
        reply = await nc.request(f"{_JS_API}.STREAM.UPDATE.{stream}", body, timeout=REQUEST_TIMEOUT)
        updated = msgspec.json.decode(reply.data)
    except Exception:
        return False
    return bool((updated.get("config") or {}).get("allow_batched"))


def _status_error(msg: Msg) -> Exception:
    headers = msg.headers or {}
    status = headers.get(_STATUS, "")
    if status == "503":
        return NoRespondersError()
    code = int(status) if status.isdigit() else None
    return APIError(code=code, description=headers.get(_DESCRIPTION) or None)


def _ack_error(reply: Msg) -> Exception | None:
    """What is wrong with a JetStream publish's reply, None for a PubAck."""
    if not reply.data:
        return _status_error(reply)  # 503: no stream listens (the bucket was deleted)
    try:
        ack = _decode_pub_ack(reply.data)
    except msgspec.MsgspecError:
        return APIError(description=f"invalid PubAck: {reply.data[:200]!r}")
    if ack.error is None:
        return None
    err = ack.error
    return APIError(
        code=err.get("code"), description=err.get("description"), err_code=err.get("err_code")
    )


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
    """Event ids one (service, handler) has handled, kept for `ttl` seconds.

    `seen` calls of one event-loop iteration share one batched direct get (up to
    `BATCH_KEYS` keys a request); a server older than 2.11 refuses the batch and is
    then asked key by key (`batched` turns False). A bucket created before Direct Get
    was allowed on it (`direct` is False) is read through the KV API as before. A
    failure (a timeout after `timeout` seconds, no responders, an error status) raises
    to every caller of the batch, each its own copy of the exception.
    """

    timeout = REQUEST_TIMEOUT

    def __init__(
        self, kv: Any, bucket: str | None = None, mux: _Mux | None = None, direct: bool = False
    ) -> None:
        super().__init__(kv)
        self._mux = mux
        self._pre = f"$KV.{bucket}."
        self._direct_get = f"{_JS_API}.DIRECT.GET.KV_{bucket}"
        self.direct = direct and mux is not None and bucket is not None
        self.batched = True  # multi_last until the server refuses it
        self.fast = False  # marks stored as fast-ingest batches (see `_allow_fast_ingest`)
        self._queue: list[tuple[str, asyncio.Future[bool]]] = []
        self._scheduled = False
        self._marks: list[tuple[str, asyncio.Future[None]]] = []
        self._marks_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, client: Client, service: str, handler: str, ttl: float = DEFAULT_TTL
    ) -> ProcessedIds:
        bucket = f"processed_{service}_{handler}"
        kv = await open_bucket(client, bucket, ttl, f"event ids handled by {service}.{handler}")
        status = await kv.status()
        direct = bool(status.stream_info.config.allow_direct)
        processed = cls(kv, bucket, await _mux_of(client), direct)
        processed.fast = await _allow_fast_ingest(client, f"KV_{bucket}")
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
        if self._mux is None:
            await self._put(event_id, b"1")
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._marks.append((self._pre + kv_key(event_id), future))
        if not self._marks_scheduled:
            self._marks_scheduled = True
            loop.call_soon(self._flush_marks)
        await future

    # Batched stores ----------------------------------------------------------------

    def _flush_marks(self) -> None:
        """Publish what `mark` queued in this loop iteration; one waiter for the acks."""
        self._marks_scheduled = False
        marks, self._marks = [m for m in self._marks if not m[1].done()], []
        for start in range(0, len(marks), BATCH_KEYS):
            self._spawn(self._store(marks[start : start + BATCH_KEYS]))

    async def _store(self, marks: list[tuple[str, asyncio.Future[None]]]) -> None:
        assert self._mux is not None
        if self.fast and await self._stored_fast(marks):
            return
        try:
            replies = await self._mux.request_each([(s, b"1") for s, _ in marks], self.timeout)
        except BaseException as exc:
            _fail([f for _, f in marks], exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(marks, replies, strict=True):
            if not future.done():
                error = _ack_error(reply)
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def _stored_fast(self, marks: list[tuple[str, asyncio.Future[None]]]) -> bool:
        """One fast-ingest batch for the marks; False when it failed and they must be
        stored one by one (each then gets its own PubAck, so its own error)."""
        assert self._mux is not None
        try:
            await self._mux.fast_batch([s for s, _ in marks], b"1", self.timeout)
        except _Unsupported:
            self.fast = False  # for good: this server or stream does not do fast ingest
            return False
        except Exception:
            return False
        for _, future in marks:
            if not future.done():
                future.set_result(None)
        return True

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
            except _Unsupported:
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
                    raise _Unsupported(f"reply without headers: {msg.data[:200]!r}")
                status = headers.get(_STATUS)
                if status is None:
                    if _NUM_PENDING not in headers:
                        raise _Unsupported("a single reply to a batched request")
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
                    raise _Unsupported(f"{status} {headers.get(_DESCRIPTION, '')}")
                raise _status_error(msg)  # 503 no responders and the like: an error
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
                raise _status_error(msg)
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
