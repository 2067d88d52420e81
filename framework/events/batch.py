"""Publishing in batches: many events in flight, a bounded number unacknowledged.

Split from `publish` (one event, awaited): the batch sends without awaiting each ack,
reads the acks inline on an inbox of its own, and sends again what a stream without a
reachable leader refused, by the same rule (`publish.retryable`), within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from nats.errors import NoRespondersError
from nats.js.errors import APIError, NoStreamResponseError

from ..errors import PublishError, StreamUnavailable
from ..transport import wire
from ..transport.wire import header_block
from ..transport.wire_errors import api_error, publish_error, status_error
from ..transport.wire_errors import decode_pub_ack as _decode_pub_ack
from .publish import (
    ATTEMPT_TIMEOUT,
    NO_ACK,
    PublishAck,
    build_event,
    check_size,
    end_span,
    is_clustered,
    producer_span,
    retryable,
)

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["BatchPublisher"]


RETRY_FIRST_PAUSE = 0.1  # a batch's refused event is sent again after 0.1 s, doubling
RETRY_MAX_PAUSE = 1.0  # ... up to 1 s between two attempts
_NO_LEADER = (
    "no stream answered: its stream has no leader reachable from this server (an "
    "election, a network partition), or no stream captures it"
)
# a batch's pending event: id, subject, first sent (time.monotonic()), span, body and
# header block (what sending it again needs)
_Entry = tuple[str, str, float, Any, bytes, bytes]
MAX_PROBES = 16  # subjects a batch asks JetStream about ("does a stream capture it?")


def _refusal(failure: BaseException) -> str:
    """A retryable refusal in words, for the error of an event that ran out of time."""
    if isinstance(failure, NoRespondersError):
        return _NO_LEADER
    if isinstance(failure, APIError):
        return f"JetStream is unavailable: {failure.description or failure.err_code}"
    return ""


class _Retry:
    """What a batch remembers of an event it sends again (only of those)."""

    __slots__ = ("attempts", "due", "sent", "why")

    def __init__(self, sent: float) -> None:
        self.attempts = 1  # sends so far
        self.sent = sent  # the last one (time.monotonic())
        self.due: float | None = None  # when to send it again after a refusal
        self.why = ""  # the last refusal in words ("": not answered)

    def pause(self) -> float:
        return min(RETRY_MAX_PAUSE, RETRY_FIRST_PAUSE * 2.0 ** (self.attempts - 1))


class BatchPublisher:
    """Publishes without waiting for each ack, with at most `max_outstanding` unacked.

    Acks come back on one wildcard inbox of its own, matched by a counter token and
    decoded with msgspec: no future, task or callback per event, and no yield to the
    event loop while a slot is free (nats-py's `publish_async` pays for all of these).

    An event refused the way a stream without a reachable leader refuses (`retryable`,
    the rule `publish` follows too: on a cluster a 503 "no responders" or JetStream's
    "temporarily unavailable"; anywhere, no ack within 2 s) is sent again with the
    same event id, so it is stored once: after 0.1 s doubling to 1 s (unanswered:
    at once), while `timeout` since its first send allows. It keeps its slot
    meanwhile; the publisher's one timer sends it again from what its pending entry
    keeps (subject, body, header block), so a leader election delays a batch instead
    of failing it. Out of time, or refused for any other reason (no stream: on a
    cluster JetStream is asked; not permitted; a real API error), it is a failure. `flush()` (also on leaving `async with`) waits for
    every ack and retry and raises `PublishError` naming how many events were not
    stored (`failures`). `acks`, `failures` and `retried` describe one batch: the
    first publish after a flush starts new ones, so a publisher kept for a long stream
    holds no more than a batch.
    """

    def __init__(
        self, client: Client, *, max_outstanding: int = 256, timeout: float = 10.0
    ) -> None:
        self._client = client
        self._slots = anyio.Semaphore(max_outstanding)
        self._timeout = timeout
        self._pending: dict[str, _Entry] = {}  # token -> the event, until acked or failed
        self._retries: dict[str, _Retry] = {}  # token -> attempts, of events sent again
        self._timer: asyncio.TimerHandle | None = None  # runs `_tick`
        self._timer_at = 0.0
        self._count = 0
        self._prefix = ""
        self._sub: Any = None
        self._settled = anyio.Event()
        self.acks: list[PublishAck] = []  # each stored event once
        self.failures: list[tuple[str, str]] = []  # (event id, error)
        self.retried = 0  # sends again (of refused or unanswered events) in this batch
        self._probes: dict[str, str] = {}  # token -> subject, of questions asked
        self._probed: set[str] = set()  # subjects asked about in this batch
        self._uncaptured: set[str] = set()  # ... that no stream captures
        self._flushed = False  # the next publish starts a new batch

    async def __aenter__(self) -> BatchPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.flush()

    async def publish(
        self,
        event_type: str,
        event: Any,
        *,
        event_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        correlation_id: str | None = None,
        key: str | None = None,
    ) -> str:
        """Send one event without waiting for its ack; returns its event id.

        Waits only while `max_outstanding` events are unacknowledged (an event being
        retried counts). Arguments are those of `Client.publish` (`key` too); failures
        are collected for `flush()` (`failures`), except those known at once (too
        large, no slot in time), raised here.
        """
        self._client.check_open()
        built = build_event(
            self._client, event_type, event, event_id, headers, correlation_id, None, key
        )
        subject, data, out, event_id = built
        if self._flushed:
            self._flushed = False
            self.acks, self.failures, self.retried = [], [], 0
        span = producer_span(event_type, out, event_id, None)  # ends when the ack comes
        try:
            check_size(self._client, data, out)
        except PublishError as exc:
            end_span(span, exc)
            raise
        await self._ack_inbox()
        await self._send(subject, data, out, event_id, span)
        return event_id

    async def _send(
        self, subject: str, data: bytes, out: dict[str, str], event_id: str, span: Any
    ) -> None:
        """Take a slot, then publish with this batch's reply subject for the ack."""
        try:
            await self._take_slot(event_id)
        except PublishError as exc:
            end_span(span, exc)
            raise
        self._count += 1
        token = format(self._count, "x")
        now = time.monotonic()
        try:
            block = header_block(out)  # nats-py's bytes, encoded once (BadHeaderError below)
            self._pending[token] = (event_id, subject, now, span, data, block)
            await wire.publish(self._client.nc, subject, data, self._prefix + token, block)
        except Exception as exc:
            self._pending.pop(token, None)
            self._slots.release()
            error = publish_error(subject, exc)
            end_span(span, error)
            raise error from None
        if self._timer is None:
            self._wake_at(now + min(ATTEMPT_TIMEOUT, self._timeout))

    async def _ack_inbox(self) -> None:
        """The wildcard inbox the acks of this batch come back on, subscribed once."""
        if self._sub is None:
            nc = self._client.nc
            self._prefix = nc.new_inbox() + "."
            self._sub = await wire.subscribe_inline(nc, self._prefix + "*", self._on_ack)

    async def _take_slot(self, event_id: str) -> None:
        try:
            self._slots.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        while True:
            with anyio.move_on_after(self._timeout):
                await self._slots.acquire()
                return
            if not self._expire(time.monotonic() - self._timeout):
                raise PublishError(
                    f"no slot for {self._timeout:g}s ({len(self._pending)} unacknowledged); "
                    f"{event_id} was not sent"
                )

    def _expire(self, sent_before: float) -> int:
        """Events first sent before `sent_before` and still not stored are failures."""
        late = [token for token, entry in self._pending.items() if entry[2] <= sent_before]
        for token in late:
            entry = self._pending.pop(token)
            self._fail(token, entry, self._out_of_time(entry[1], self._retries.get(token)))
        return len(late)

    def _out_of_time(self, subject: str, retry: _Retry | None) -> PublishError:
        """The error of an event that was not stored within `timeout`."""
        if retry is None:
            return PublishError(f"no acknowledgement within {self._timeout:g}s")
        clustered = is_clustered(self._client)
        why = retry.why or (NO_ACK if clustered else "no acknowledgement from JetStream")
        kind = StreamUnavailable if clustered or retry.why else PublishError
        return kind(
            f"{subject}: {why}; {retry.attempts} attempt(s) in {self._timeout:g} s. Not "
            "stored (or not known stored): retry, publishing again with the same event "
            "id is safe, it is stored once"
        )

    def _fail(self, token: str, entry: _Entry, error: PublishError) -> None:
        """`entry` (taken out of the pending ones) was not stored: a failure."""
        self._slots.release()
        if self._retries:
            self._retries.pop(token, None)
        self.failures.append((entry[0], str(error)))
        end_span(entry[3], error)
        if not self._pending:
            self._settled.set()

    def _on_ack(self, msg: Any) -> None:
        """JetStream's answer, read inline in nats-py's read loop: nothing awaits here."""
        token = msg.subject[len(self._prefix) :]
        entry = self._pending.pop(token, None)
        if entry is None:  # failed already, an earlier attempt's answer, or a probe's
            if self._probes:
                self._on_probe(token, msg)
            return
        if not msg.data:  # a status instead of an ack: 503, no stream answered
            self._refused(token, entry, status_error(msg))
            return
        try:
            ack = _decode_pub_ack(msg.data)
        except msgspec.MsgspecError as exc:
            self._fail(token, entry, PublishError(f"unreadable ack: {exc}"))
            return
        if ack.error:
            self._refused(token, entry, api_error(ack.error))
            return
        self._slots.release()
        if self._retries:
            self._retries.pop(token, None)
        self.acks.append(PublishAck(ack.stream, ack.seq, entry[0], ack.duplicate))
        entry[3].end()
        if not self._pending:
            self._settled.set()

    def _refused(self, token: str, entry: _Entry, failure: Exception) -> None:
        """Sent again later if `failure` is retryable and time is left; else a failure."""
        subject, clustered = entry[1], is_clustered(self._client)
        if subject in self._uncaptured:
            failure = NoStreamResponseError()
        elif clustered and isinstance(failure, NoRespondersError):
            self._probe(subject)  # or is it that no stream captures the subject?
        if not retryable(failure, clustered):
            self._fail(token, entry, publish_error(subject, failure))
        elif not self._retry_later(token, entry, failure):
            self._fail(token, entry, self._out_of_time(entry[1], self._retries.get(token)))

    def _retry_later(self, token: str, entry: _Entry, failure: Exception) -> bool:
        """Keep a refused event pending (with its slot) to be sent again after a pause
        (the last one shortened to end just before its timeout); False when no time is
        left. A late refusal of an earlier attempt of an event already waiting changes
        nothing."""
        retry = self._retries.get(token)
        if retry is None:
            retry = self._retries[token] = _Retry(entry[2])
        if retry.due is None:
            retry.why = _refusal(failure)
            now = time.monotonic()  # the last attempt goes just before the timeout
            retry.due = min(now + retry.pause(), entry[2] + self._timeout - RETRY_FIRST_PAUSE)
            if retry.due <= now:
                return False
        self._pending[token] = entry
        self._wake_at(retry.due)
        return True

    def _probe(self, subject: str) -> None:
        """Ask JetStream (once a batch per subject, for at most `MAX_PROBES`) whether a
        stream captures `subject`; the answer comes to this batch's inbox (`_on_probe`).
        On a cluster a 503 also means that, and such an event fails at once, as a
        single `publish` does, instead of being retried until its timeout."""
        if subject in self._probed or len(self._probed) >= MAX_PROBES:
            return
        self._count += 1
        token = f"p{self._count:x}"  # not a hex counter: no event's token
        query = b'{"subject":' + msgspec.json.encode(subject) + b"}"
        nc = self._client.nc
        if wire.publish_now(nc, "$JS.API.STREAM.NAMES", query, self._prefix + token):
            self._probed.add(subject)
            self._probes[token] = subject

    def _on_probe(self, token: str, msg: Any) -> None:
        """JetStream's list of the streams that capture a subject: if there are none,
        that subject's events fail now as `NoStream` (nothing was stored)."""
        subject = self._probes.pop(token, None)
        if subject is None:
            return
        try:
            names = msgspec.json.decode(msg.data or b"{}")
        except msgspec.MsgspecError:
            return
        if not isinstance(names, dict) or names.get("error") or names.get("streams"):
            return  # captured (it has no leader now), or JetStream cannot say
        self._uncaptured.add(subject)
        error = publish_error(subject, NoStreamResponseError())
        for late in [t for t, entry in self._pending.items() if entry[1] == subject]:
            self._fail(late, self._pending.pop(late), error)

    def _wake_at(self, when: float) -> None:
        """Run `_tick` at `when` (`time.monotonic()`), unless it runs before already."""
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        delay = max(0.0, when - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        """The publisher's timer: what is past its timeout fails, what is due is sent
        again (a refused event after its pause, an unanswered one after
        `ATTEMPT_TIMEOUT`), and the timer is set for the next of these."""
        self._timer = None
        now = time.monotonic()
        self._expire(now - self._timeout)
        wake = math.inf
        for token, entry in self._pending.items():
            wake = min(wake, self._resend_if_due(token, entry, now), entry[2] + self._timeout)
        if wake < math.inf:
            self._wake_at(wake)

    def _resend_if_due(self, token: str, entry: _Entry, now: float) -> float:
        """Send `entry` again (same event id, reply subject and headers) if its time has
        come; returns when to look at it again."""
        retry = self._retries.get(token)
        if retry is not None and retry.due is not None:
            due = retry.due
        else:  # in flight: sent again when unanswered for ATTEMPT_TIMEOUT
            due = (entry[2] if retry is None else retry.sent) + ATTEMPT_TIMEOUT
            if retry is not None and due <= now:
                retry.why = ""
        if due > now:
            return due
        if retry is None:
            retry = self._retries[token] = _Retry(entry[2])
        _, subject, _, _, data, block = entry
        if wire.publish_now(self._client.nc, subject, data, self._prefix + token, block):
            retry.attempts += 1
            retry.sent, retry.due = now, None
            self.retried += 1
            return now + ATTEMPT_TIMEOUT
        retry.due = now + RETRY_FIRST_PAUSE  # reconnecting, or a full buffer: soon again
        return retry.due

    async def flush(self) -> list[PublishAck]:
        """Every ack, or `PublishError` listing what was not stored (`failures`).

        Waits (at most `timeout`) for the acks, events being sent again included: an
        event refused during a leader election is stored and acknowledged here once
        the stream has a leader again, or fails once its `timeout` is over.
        """
        with anyio.move_on_after(self._timeout):
            while self._pending:
                self._settled = anyio.Event()
                await self._settled.wait()
        self._expire(math.inf)
        self._flushed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._retries.clear()
        self._probes.clear()
        self._probed.clear()
        self._uncaptured.clear()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self.failures:
            failed, first = len(self.failures), self.failures[0][1]
            raise PublishError(f"{failed} event(s) not stored; first error: {first}")
        return self.acks
