"""The framework's own header encoding and publish path: nats-py's bytes, for less.

`framework.transport.wire` writes `PUB`/`HPUB` commands itself; they must be exactly
what nats-py's `_send_publish` would queue, on hostile input too, and messages must
still get through when the fast path cannot be taken.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.errors import BadHeaderError

from framework.testing import eventually
from framework.transport import wire
from framework.transport.headers import EventFields, outgoing
from framework.transport.timers import Deadlines

KEYS = [
    "Nats-Msg-Id", "Correlation-Id", "traceparent", "X-A", " padded ", "", " ", "a.b_c~d",
    "caf\u00e9", "bad key", "colon:key", "tab\tkey", "new\nline", "x" * 40,
]  # fmt: skip
VALUE_PIECES = [
    "a", "Z", "0", "-", " ", "\t", "\r", "\n", "\r\n", ": ", "\u00e9", "\u4e2d", "\U0001f600",
    "\x00", "\x7f", "1700000000000", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
]  # fmt: skip


async def queued(nc: NATS, send: Awaitable[None]) -> bytes:
    """The command a publish queued on a real connection: neither nats-py's publish nor
    `wire.publish` yields before queueing it, so it is the last pending one after."""
    before = len(nc._pending)
    await send
    assert len(nc._pending) == before + 1, "the command was sent already"
    command: bytes = nc._pending[-1]
    return command


def random_headers(rng: random.Random) -> dict[str, str]:
    return {
        rng.choice(KEYS): "".join(rng.choice(VALUE_PIECES) for _ in range(rng.randint(0, 6)))
        for _ in range(rng.randint(1, 6))
    }


async def test_header_blocks_and_commands_are_what_nats_py_sends(client: Any) -> None:
    nc = client.nc
    rng = random.Random(20261123)
    checked = refused = 0
    for _ in range(3000):
        headers = random_headers(rng)
        payload = rng.choice([b"", b"{}", b'{"id":1}', "caf\u00e9".encode(), b"x" * 300])
        reply = rng.choice(["", "_INBOX.abc.7f"])
        try:
            expected = await queued(
                nc, nc.publish("enc.test", payload, reply=reply, headers=headers)
            )
        except BadHeaderError as exc:
            with pytest.raises(BadHeaderError) as ours:
                wire.header_block(headers)
            assert ours.value.args == exc.args  # the same key named
            refused += 1
            continue
        block = wire.header_block(headers)
        ours = await queued(nc, wire.publish(nc, "enc.test", payload, reply, block))
        assert ours == expected, headers
        checked += 1
    assert checked > 500 and refused > 500  # both kinds of input were exercised


async def test_commands_without_headers_are_what_nats_py_sends(client: Any) -> None:
    nc = client.nc
    for payload in (b"", b"{}", b"x" * 1000):
        for reply in ("", "_INBOX.abc.1"):
            expected = await queued(nc, nc.publish("a.b", payload, reply=reply))
            ours = await queued(nc, wire.publish(nc, "a.b", payload, reply, None))
            assert ours == expected


async def test_messages_arrive_through_the_fast_path_and_the_fallback(client: Any) -> None:
    nc = client.nc
    assert wire.fast_path(nc)
    received: list[Any] = []

    async def keep(msg: Any) -> None:
        received.append((msg.data, msg.headers))

    await nc.subscribe("wire.test", cb=keep)
    await nc.flush()
    block = wire.header_block({"X-A": "1", "Correlation-Id": "c-1"})
    await wire.publish(nc, "wire.test", b"fast", "", block)
    limit = nc._max_pending_size
    nc._max_pending_size = 1  # every message is over it: nc.publish sends (and flushes)
    try:
        await wire.publish(nc, "wire.test", b"fallback", "", block)
        await wire.publish(nc, "wire.test", b"plain", "", None)
    finally:
        nc._max_pending_size = limit
    await nc.flush()
    await eventually(lambda: len(received) == 3, what="the three messages")
    headers = {"X-A": "1", "Correlation-Id": "c-1"}
    assert received == [(b"fast", headers), (b"fallback", headers), (b"plain", None)]


def test_outgoing_headers_of_calls_and_events() -> None:
    class Parent:
        correlation_id = "corr-1"
        message_id: str | None = "evt-0"

    assert outgoing() is None  # nothing to say: no header block at all
    assert outgoing(correlation_id="c-2", deadline=1700000000.1234) == {
        "Correlation-Id": "c-2",
        "Deadline": "1700000000123",
    }
    assert outgoing({"X-T": "t", "Correlation-Id": "mine"}, parent=Parent()) == {
        "X-T": "t",
        "Correlation-Id": "corr-1",  # the conversation wins over a header given by hand
        "Causation-Id": "evt-0",
    }
    fields = EventFields("e-1", "order.created.v1", "2026-11-22T10:37:05.123Z", "shop")
    assert outgoing(event=fields) == {
        "Nats-Msg-Id": "e-1",
        "Event-Type": "order.created.v1",
        "Event-Time": "2026-11-22T10:37:05.123Z",
        "Producer": "shop",
        "Correlation-Id": "e-1",  # an event starts its own conversation
    }


async def test_deadlines_fire_in_order_once_and_never_after_done() -> None:
    fired: list[str] = []
    deadlines = Deadlines(fired.append)
    deadlines.add(0.05, "late")
    deadlines.add(0.01, "early")
    key = deadlines.add(0.02, "finished in time")
    deadlines.done(key)
    deadlines.add(10.0, "far")
    await eventually(lambda: len(fired) == 2, what="the two deadlines to pass")
    assert fired == ["early", "late"]
    assert len(deadlines) == 1  # "far" is still watched
    deadlines.close()
    assert len(deadlines) == 0


async def test_deadlines_heap_stays_proportional_to_what_is_watched() -> None:
    deadlines = Deadlines(lambda target: None)
    for i in range(10_000):  # requests that all finish in time, 8 in flight
        key = deadlines.add(30.0, i)
        if i >= 8:
            deadlines.done(key - 8)
    assert len(deadlines) == 8
    assert len(deadlines._heap) <= 2 * 8 + 64 + 1
    deadlines.close()


async def test_deadlines_callback_may_add_more() -> None:
    fired: list[int] = []
    deadlines = Deadlines(lambda n: (fired.append(n), n < 3 and deadlines.add(0.001, n + 1)))
    deadlines.add(0.001, 0)
    await eventually(lambda: len(fired) == 4, what="four deadlines, each added by the last")
    assert fired == [0, 1, 2, 3]


async def test_inline_subscriptions_fall_back_to_a_callback(nats_url: str) -> None:
    """A nats-py whose `subscribe` takes no `future=` gets an ordinary callback."""

    class WithoutFuture(NATS):
        async def subscribe(self, subject: str, queue: str = "", cb: Any = None) -> Any:  # type: ignore[override]
            return await super().subscribe(subject, queue=queue, cb=cb)

    received: list[bytes] = []
    for nc in (NATS(), WithoutFuture()):
        await nc.connect(nats_url)
        try:
            sub = await wire.subscribe_inline(nc, "inline.test", lambda m: received.append(m.data))
            assert (sub._future is not None) is (type(nc) is NATS)
            await nc.publish("inline.test", b"x")
            await nc.flush()
            count = 1 if type(nc) is NATS else 2
            await eventually(lambda count=count: len(received) == count, what="the message")
        finally:
            await nc.close()
    assert received == [b"x", b"x"]


async def test_a_deadline_callback_that_raises_does_not_strand_the_others() -> None:
    """One expiry failing (a settlement whose task group is gone) must not leave the
    other requests that expired in the same tick waiting forever."""
    fired: list[str] = []

    def expire(target: str) -> None:
        if target == "broken":
            raise RuntimeError("this task group is not active")
        fired.append(target)

    deadlines = Deadlines(expire)
    deadlines.add(0.01, "broken")
    deadlines.add(0.01, "waiting")
    deadlines.add(0.03, "later")
    await eventually(lambda: len(fired) == 2, what="the others to expire")
    assert fired == ["waiting", "later"]
