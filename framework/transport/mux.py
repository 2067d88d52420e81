"""Requests over one wildcard inbox subscription per connection.

nats-py's `request` costs a NUID, random bytes, two bytearray copies and
`asyncio.wait_for` per call; here a request is a counter token, a future, a heap
entry for its timeout (`timers.Deadlines`: one loop timer for all of them, where
`asyncio.timeout` costs 5 us a use) and a publish with a pre-encoded header block
(`wire`), and one subscription serves every kind of request the framework makes:
calls (one reply), batched direct gets (replies up to an end-of-batch status) and
fast-ingest batches (nats-server 2.14+: the batch's first message and its commit
are answered, not each message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError

from ..errors import PermissionDenied
from . import wire
from .timers import Deadlines
from .wire_errors import status_error

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

__all__ = ["Mux", "Unsupported", "status_error"]

_STATUS = "Status"
_DESCRIPTION = "Description"
_NUM_PENDING = "Nats-Num-Pending"
# Fast-ingest batches: the reply subject carries the protocol,
# `<inbox>.<flow>.<gap>.<batch seq>.<operation>.$FI`.
_FAST_FLOW = 1000  # ack cadence asked for: more than a batch holds, so only its ends
_FI_START, _FI_ADD, _FI_COMMIT = 0, 1, 2
_FAST_UNSUPPORTED = frozenset({10205, 10206})  # batch publish disabled, invalid pattern


class Unsupported(Exception):
    """The server refused a kind of request it does not know (older than needed)."""


class _FastBatch:
    """Collects the frames of one fast-ingest batch; resolves on the terminal one."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class Mux:
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
        # A fast-ingest batch id must be unique per stream, not per connection: the
        # server keys open batches by id alone, and two connections sending batch "1f"
        # at once merge into one (the second's commit goes unanswered on a cluster;
        # bench/fast_batch_ids.py). The inbox's NUID makes the counter token unique.
        self._batch_suffix = self._prefix.rsplit(".", 2)[-2]
        self._sub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._count = 0
        # token -> (future, replies collected so far; None for a single reply; or the
        # fast-ingest batch whose terminal frame is awaited)
        self._pending: dict[str, tuple[asyncio.Future[Any], list[Msg] | _FastBatch | None]] = {}
        self._timeouts = Deadlines(_expire)
        self._subjects: dict[str, str] = {}  # token -> subject, of `request`s (see `refuse`)
        self.requests = 0  # messages sent, for tests and diagnostics
        self.replies = 0  # messages received, likewise

    @property
    def ready_now(self) -> bool:
        return self._sub is not None

    async def ready(self) -> None:
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self._sub = await wire.subscribe_inline(
                        self._nc, self._prefix + ">", self._on_reply
                    )

    def _register(
        self, many: bool, batch: _FastBatch | None = None
    ) -> tuple[str, asyncio.Future[Any]]:
        self._count += 1
        token = format(self._count, "x")
        if batch is not None:
            token += self._batch_suffix
        loop = self._loop
        if loop is None:  # looked up once: asyncio's lookup asks the kernel for the pid
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[token] = (future, batch if batch is not None else [] if many else None)
        return token, future

    async def _publish(
        self, subject: str, data: bytes, token: str, headers: bytes | None = None
    ) -> None:
        self.requests += 1
        await wire.publish(self._nc, subject, data, self._prefix + token, headers)

    async def request(
        self,
        subject: str,
        data: bytes,
        timeout: float,
        headers: bytes | Mapping[str, str] | None = None,
    ) -> Msg:
        """One request, one reply: what nats-py's `request` does, for less.

        `headers`: an encoded header block (`wire.header_block`, what the framework's
        hot paths pass, encoded once), a mapping (encoded here), or None.
        """
        if headers is not None and not isinstance(headers, bytes):
            headers = wire.header_block(headers) if headers else None
        token, future = self._register(False)
        self._subjects[token] = subject
        key = 0
        try:
            await self._publish(subject, data, token, headers)
            key = self._timeouts.add(timeout, future)
            reply: Msg = await future
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            self._timeouts.done(key)
            del self._pending[token]
            del self._subjects[token]
        if reply.headers and reply.headers.get(_STATUS) == "503":
            raise NoRespondersError
        return reply

    async def request_each(
        self,
        requests: Sequence[tuple[str, bytes]],
        timeout: float,
        headers: Sequence[dict[str, str] | None] | None = None,
    ) -> list[Msg]:
        """Several requests sent at once, one reply each, in the order of `requests`
        (`headers`, if given, are each request's, in the same order)."""
        tokens: list[str] = []
        futures: list[asyncio.Future[Any]] = []
        key = 0
        try:
            for index, (subject, data) in enumerate(requests):
                token, future = self._register(False)
                tokens.append(token)
                futures.append(future)
                own = headers[index] if headers else None
                await self._publish(subject, data, token, wire.header_block(own) if own else None)
            key = self._timeouts.add(timeout, futures)
            return [await future for future in futures]
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            self._timeouts.done(key)
            for token in tokens:
                del self._pending[token]
            for future in futures:
                future.cancel()  # a no-op on those resolved; retrieves nothing

    async def request_many(self, subject: str, data: bytes, timeout: float) -> list[Msg]:
        """A direct get answered by several messages, up to a status (`204 EOB`, an
        error) or a message without `Nats-Num-Pending` (a server that does not batch)."""
        token, future = self._register(True)
        key = 0
        try:
            await self._publish(subject, data, token)
            key = self._timeouts.add(timeout, future)
            replies: list[Msg] = await future
            return replies
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            self._timeouts.done(key)
            del self._pending[token]

    async def fast_batch(self, subjects: Sequence[str], data: bytes, timeout: float) -> None:
        """Store one message on each subject as one fast-ingest batch (nats-server 2.14+,
        `allow_batched` on the stream): the server answers the batch's first message and
        its commit, not every message. Returns once all of them are stored; raises
        `Unsupported` when the server or stream does not do fast ingest, `APIError` when
        a message was refused or the batch was cut short.
        """
        batch = _FastBatch(len(subjects))
        token, future = self._register(False, batch)
        key = 0
        prefix = f"{self._prefix}{token}.{_FAST_FLOW}.fail."
        last = len(subjects)
        try:
            for seq, subject in enumerate(subjects, 1):
                op = _FI_COMMIT if seq == last else _FI_START if seq == 1 else _FI_ADD
                self.requests += 1
                await wire.publish(self._nc, subject, data, f"{prefix}{seq}.{op}.$FI")
            key = self._timeouts.add(timeout, future)
            await future
        except TimeoutError:
            raise NatsTimeoutError from None
        finally:
            self._timeouts.done(key)
            del self._pending[token]

    def fast_batch_now(
        self,
        subjects: Sequence[str],
        data: bytes,
        timeout: float,
        done: Callable[[Exception | None], None],
    ) -> bool:
        """`fast_batch` without awaiting: the messages are queued now and `done` is
        called once with None (all stored) or the error `fast_batch` would raise, as
        the commit's reply is read (or at the timeout). False when the messages cannot
        be queued now (not subscribed yet, reconnecting, a full buffer): then nothing
        was sent and `done` is never called."""
        if self._sub is None or not subjects:
            return False
        self._count += 1
        token = format(self._count, "x") + self._batch_suffix  # unique per stream (above)
        prefix = f"{self._prefix}{token}.{_FAST_FLOW}.fail."
        last = len(subjects)
        commands = [
            wire.command(
                subject,
                data,
                f"{prefix}{seq}.{_FI_COMMIT if seq == last else _FI_START if seq == 1 else _FI_ADD}"
                ".$FI",
            )
            for seq, subject in enumerate(subjects, 1)
        ]
        if not wire.queue(self._nc, commands, len(data) * last):
            return False
        self.requests += last
        callback = _Callback(self, token, done)
        self._pending[token] = (callback, _FastBatch(last))  # type: ignore[assignment]
        callback.key = self._timeouts.add(timeout, callback)
        return True

    def refuse(self, subject: str, reason: str) -> None:
        """The server refused a publish to `subject` (a permissions violation, which
        nats-py reports only to the error callback, lowercased): the `request`s to it
        fail now with `PermissionDenied`, instead of waiting out their timeouts."""
        subject = subject.lower()
        for token, sent_to in list(self._subjects.items()):
            if sent_to.lower() == subject:
                future = self._pending[token][0]
                if not future.done():
                    future.set_exception(PermissionDenied(reason))

    def write_now(self) -> None:
        """Send what is queued on the connection now (`wire.write_now`)."""
        wire.write_now(self._nc)

    def _on_reply(self, msg: Msg) -> None:
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


def _expire(waiting: asyncio.Future[Any] | list[asyncio.Future[Any]]) -> None:
    """A request's time is up: its future (of several, the first not yet resolved,
    the one being awaited) fails with TimeoutError."""
    futures = waiting if isinstance(waiting, list) else (waiting,)
    for future in futures:
        if not future.done():
            future.set_exception(TimeoutError())
            return


class _Callback:
    """Where a future would be, for `fast_batch_now`: resolved once, it forgets the
    request and calls back (the reply path and the timeout treat it as a future)."""

    __slots__ = ("_done", "_mux", "_resolved", "_token", "key")

    def __init__(self, mux: Mux, token: str, done: Callable[[Exception | None], None]) -> None:
        self._mux = mux
        self._token = token
        self._done = done
        self._resolved = False
        self.key = 0

    def done(self) -> bool:
        return self._resolved

    def set_result(self, _: object) -> None:
        self._finish(None)

    def set_exception(self, exc: BaseException) -> None:
        self._finish(exc if isinstance(exc, Exception) else Exception(repr(exc)))

    def _finish(self, error: Exception | None) -> None:
        if self._resolved:
            return
        self._resolved = True
        self._mux._pending.pop(self._token, None)
        self._mux._timeouts.done(self.key)
        if isinstance(error, TimeoutError):
            error = NatsTimeoutError()
        self._done(error)


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
        future.set_exception(status_error(msg))  # 503: the stream is gone
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
            future.set_exception(Unsupported(err.get("description", "fast batch refused")))
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
        future.set_exception(Unsupported("the server answered a fast batch message alone"))
        return
    if frame.count != batch.size:
        future.set_exception(
            APIError(description=f"fast batch stored {frame.count} of {batch.size} messages")
        )
        return
    future.set_result(None)
