"""Strict priorities: pull from a kind's `high` consumer, then `normal`, then `low`.

Each priority has its own subject and durable consumer (per-priority subjects rather
than ADR-42 priority groups: those rank the *pullers* of one consumer, not the
messages, so they cannot put a later high job before an earlier low one). With free
capacity the puller asks each consumer in turn for what it holds (`no_wait` pulls,
highest first), so a backlog is always taken high before normal before low; only
when all three are empty does it wait, with one long pull per consumer, for whatever
comes first. Sweeps ask for exactly the free capacity, so nothing is taken that a
worker cannot start soon; each kind has its own puller, so one kind's backlog never
starves another kind of the same service.

Deliveries are taken as nats-py reads them (no queue and task in between) and handed
over before anything else is done, so an idle worker's handler starts one event-loop
iteration after the job is read. A long pull that delivers a job behind which its
queue is empty (the delivery's pending count, in its ack subject, is 0), or that
expires without one, is renewed by itself (right after that handler has started)
instead of waking the loop for a `no_wait` sweep of every queue and new long pulls:
an idle worker keeps waiting on every queue across a job, and the next job does not
wait for those round trips. Any other delivery ends its pull and wakes the loop as
before, so a backlog is always swept by priority.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec

from ..observability.logging import get_logger
from ..transport import wire
from ..transport.names import ack_fields
from .options import priority_of

__all__ = ["Puller", "pending_after"]

_log = get_logger("framework.jobs")

LONG_POLL = 5.0  # seconds a waiting pull lasts before it is renewed
ANSWER_GRACE = 2.0  # a pull the server has not ended this long after it should: lost
MAX_BATCH = 256
_encode = msgspec.json.Encoder().encode


def pending_after(reply: str) -> int:
    """How many messages the consumer held behind this delivery (-1: not known)."""
    fields = ack_fields(reply)
    if fields is None or not fields[6].isdigit():
        return -1
    return int(fields[6])


class _Pull:
    """The one outstanding pull request of a consumer (at most one at a time)."""

    __slots__ = ("asked", "deadline", "done", "got", "long", "token")

    def __init__(self, token: str, asked: int, deadline: float, long: bool) -> None:
        self.token = token  # in the reply subject: a late status of an older pull is ignored
        self.asked = asked
        self.got = 0
        self.deadline = deadline
        self.long = long  # waits on the server for a message (else `no_wait`)
        self.done = anyio.Event()


class Puller:
    """Pulls a kind's jobs into its worker, strictly by priority (see the module)."""

    def __init__(
        self,
        nc: Any,
        stream: str,
        consumers: Sequence[str],
        priorities: Sequence[str],
        hand_over: Callable[[Any], None],
        free: Callable[[], int],
    ) -> None:
        """`consumers` in priority order (their subjects end with `priorities`);
        `hand_over` gets every delivered message, as it is read (it must not block);
        `free` says how many more messages the worker can take."""
        self._nc = nc
        self._subjects = [f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{c}" for c in consumers]
        self._pulls: list[_Pull | None] = [None] * len(consumers)
        self._index = {priority: index for index, priority in enumerate(priorities)}
        self._hand_over = hand_over
        self._free = free
        self._inbox = ""
        self._count = 0
        self._sub: Any = None
        self._wake = anyio.Event()

    async def start(self) -> None:
        """Subscribe the inbox the pulls are answered on."""
        self._inbox = self._nc.new_inbox()
        self._sub = await wire.subscribe_inline(self._nc, self._inbox + ".*.*", self._on_message)

    async def stop(self, timeout: float) -> None:
        """Stop taking messages; those already on their way are still handed over."""
        if self._sub is not None:
            with anyio.move_on_after(timeout):
                try:
                    await self._sub.drain()
                except Exception:  # connection closed: nothing more will come
                    pass
            self._sub = None

    def wake(self) -> None:
        """Capacity was freed: pull again, unless a pull waits on every queue already
        (then there is nothing to ask for: whatever comes is delivered)."""
        if None in self._pulls:
            self._wake.set()

    async def run(self) -> None:
        """Pull until cancelled: sweep by priority, or wait on every queue when empty."""
        while True:
            self._wake = anyio.Event()
            self._expire_lost()
            found = await self._sweep()
            if found == "took":
                continue  # there may be more: look again at once, highest first
            if found == "empty":
                await self._wait_on_all()
            with anyio.move_on_after(LONG_POLL + ANSWER_GRACE):
                await self._wake.wait()  # a delivery, a pull's end or a finished job

    async def _sweep(self) -> str:
        """`no_wait` pulls, highest priority first, while capacity is free: "took"
        something, found every queue "empty", or stopped because the worker is "full"."""
        took = False
        for index in range(len(self._subjects)):
            free = self._free()
            if free <= 0 or not self._nc.is_connected:
                return "took" if took else "full"
            if self._pulls[index] is not None:
                continue  # a long pull waits there, so that queue was empty: it delivers
            pull = await self._request(index, min(free, MAX_BATCH), {"no_wait": True})
            with anyio.move_on_after(ANSWER_GRACE):
                await pull.done.wait()
            took = took or pull.got > 0
            if pull.got >= pull.asked:
                return "took"  # this queue may hold more: start again from the highest
        return "took" if took else "empty"

    async def _wait_on_all(self) -> None:
        """One long pull of one message on each empty consumer: whichever gets a job
        first wakes the loop, which then sweeps in priority order again. These are not
        counted against the free capacity (else they would block the sweeps): a worker
        may hold up to two messages more than its capacity, no more."""
        body = {"expires": int(LONG_POLL * 1e9)}
        for index in range(len(self._subjects)):
            if self._pulls[index] is None:
                await self._request(index, 1, body)

    async def _request(self, index: int, batch: int, options: dict[str, Any]) -> _Pull:
        pull, body, reply = self._pull(index, batch, options)
        self._pulls[index] = pull
        await self._nc.publish(self._subjects[index], body, reply=reply)
        return pull

    def _pull(self, index: int, batch: int, options: dict[str, Any]) -> tuple[_Pull, bytes, str]:
        """A new pull of consumer `index`: its record, request body and reply subject."""
        expires = options.get("expires", 0) / 1e9
        self._count += 1
        deadline = time.monotonic() + expires + ANSWER_GRACE
        pull = _Pull(format(self._count, "x"), batch, deadline, long=expires > 0)
        return pull, _encode({"batch": batch, **options}), f"{self._inbox}.{index}.{pull.token}"

    def _renew(self, index: int, ended: _Pull) -> None:
        """Replace consumer `index`'s long pull `ended`, which delivered the last job
        its queue held or expired, with a new one, without the loop; while the worker
        can take more, as the loop would. Otherwise the pull ends and the loop decides."""
        if self._pulls[index] is not ended:
            return  # ended meanwhile (given up on): the loop has it
        if self._free() > 0:
            pull, body, reply = self._pull(index, 1, {"expires": int(LONG_POLL * 1e9)})
            if wire.publish_now(self._nc, self._subjects[index], body, reply):
                self._pulls[index] = pull
                ended.done.set()
                return
        self._end(index)  # full, not connected or a full buffer

    def _expire_lost(self) -> None:
        """Pulls the server never ended (lost with a connection) free their capacity."""
        now = time.monotonic()
        for index, pull in enumerate(self._pulls):
            if pull is not None and pull.deadline < now:
                self._end(index)

    def _on_status(self, msg: Any) -> None:
        _, index_text, token = msg.subject.rsplit(".", 2)
        headers = msg.headers or {}
        status = headers.get("Status", "")
        if status == "100":
            return  # heartbeat
        if status == "409":
            _log.info("pull ended", status=status, description=headers.get("Description"))
        index = int(index_text)
        pull = self._pulls[index]
        if pull is not None and pull.token == token:
            if status == "408" and pull.long and not pull.got:
                self._renew(index, pull)  # expired: its queue stayed empty all along
                return
            self._end(index)

    def _end(self, index: int) -> None:
        pull = self._pulls[index]
        if pull is not None:
            self._pulls[index] = None
            pull.done.set()
            self._wake.set()

    def _on_message(self, msg: Any) -> None:
        """A delivery or a status, as nats-py reads it (see the module)."""
        if not msg.reply:  # a status: the pull is over (404 none, 408 expired, 409 ...)
            self._on_status(msg)
            return
        self._hand_over(msg)  # first: its handler starts before anything else is sent
        # a job: its subject names its priority, which is its consumer's index
        index = self._index.get(priority_of(msg.subject), -1)
        pull = self._pulls[index] if index >= 0 else None
        if pull is None:
            self._wake.set()  # a straggler of a pull given up on
            return
        pull.got += 1
        if pull.got < pull.asked:
            return  # more may come on this pull; its end wakes the loop
        if pull.long and pending_after(msg.reply) == 0:
            # renewed once the handler has started (the next step of the loop)
            asyncio.get_running_loop().call_soon(self._renew, index, pull)
            return
        self._end(index)
