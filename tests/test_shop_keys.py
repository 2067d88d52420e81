"""Event keys: keyed publish, optimistic concurrency per key, one key's history read back."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from framework import ConcurrencyConflict, Context, InvalidName, Service
from framework.testing import eventually


class Happened(msgspec.Struct, frozen=True):
    n: int


async def test_keyed_events_land_under_the_key_and_read_back_in_order(client: Any) -> None:
    await ensure_domain(client, "thing")
    for n, (event_type, key) in enumerate(
        [
            ("thing.made.v1", "t-1"),
            ("thing.made.v1", "t-2"),
            ("thing.moved.v1", "t-1"),
            ("thing.made.v1", None),
            ("thing.moved.v1", "t-1"),
        ]
    ):
        ack = await client.publish(event_type, Happened(n), key=key)
        assert ack.seq == n + 1
    history = await client.history("thing", "t-1")
    assert [(r.type, r.sequence, r.decode(Happened).n) for r in history] == [
        ("thing.made.v1", 1, 0),
        ("thing.moved.v1", 3, 2),
        ("thing.moved.v1", 5, 4),
    ]
    assert history[0].subject == "events.thing.made.v1.t-1" and history[0].key == "t-1"
    assert history[0].event_id and history[0].headers["Event-Type"] == "thing.made.v1"
    assert history[0].time <= history[-1].time
    moved = await client.history("thing.moved.v1", "t-1")
    assert [r.sequence for r in moved] == [3, 5]
    assert [r.sequence for r in await client.history("thing", "t-1", after=3)] == [5]
    assert [r.sequence for r in await client.history("thing", "t-1", limit=2)] == [1, 3]
    assert await client.history("thing", "nobody") == []


async def test_expected_last_subject_sequence_guards_the_whole_key(client: Any) -> None:
    await ensure_domain(client, "thing")
    first = await client.publish(
        "thing.made.v1", Happened(1), key="k", expected_last_subject_sequence=0
    )
    await client.publish("thing.made.v1", Happened(0), key="other")
    second = await client.publish(
        "thing.moved.v1", Happened(2), key="k", expected_last_subject_sequence=first.seq
    )
    with pytest.raises(ConcurrencyConflict) as conflict:  # a writer that read before `second`
        await client.publish(
            "thing.moved.v1", Happened(3), key="k", expected_last_subject_sequence=first.seq
        )
    assert (conflict.value.expected, conflict.value.actual) == (first.seq, second.seq)
    assert "expected last sequence 1" in str(conflict.value)
    with pytest.raises(ConcurrencyConflict):  # "new key" is 0
        await client.publish(
            "thing.made.v1", Happened(4), key="k", expected_last_subject_sequence=0
        )
    assert [r.decode(Happened).n for r in await client.history("thing", "k")] == [1, 2]


@pytest.mark.parametrize("key", ["a.b", "a*", ">", "a b", "", "x" * 129])
async def test_keys_that_are_not_one_subject_token_are_refused(client: Any, key: str) -> None:
    with pytest.raises(InvalidName, match="invalid event key"):
        await client.publish("thing.made.v1", Happened(1), key=key)
    with pytest.raises(InvalidName, match="invalid event key"):
        await client.history("thing", key)


async def test_subscribers_receive_keyed_and_unkeyed_events_alike(serve: Any, client: Any) -> None:
    seen: list[tuple[int, str]] = []
    service = Service("keyed-listener")

    @service.subscribe("thing.made.v1")
    async def on_made(event: Happened, ctx: Context) -> None:
        seen.append((event.n, ctx.subject))

    await serve(service)
    await client.publish("thing.made.v1", Happened(1))
    await client.publish("thing.made.v1", Happened(2), key="t-9")
    await client.publish("thing.moved.v1", Happened(3), key="t-9")  # another type: not seen
    async with client.batch() as batch:
        await batch.publish("thing.made.v1", Happened(4), key="t-10")
    await eventually(lambda: len(seen) == 3)
    assert sorted(seen) == [
        (1, "events.thing.made.v1"),
        (2, "events.thing.made.v1.t-9"),  # the handler sees the key in ctx.subject
        (4, "events.thing.made.v1.t-10"),
    ]


async def ensure_domain(client: Any, domain: str) -> None:
    from framework.streams import domain_stream, ensure_stream

    await ensure_stream(client, domain_stream(domain))


async def test_a_consumer_from_before_event_keys_gains_the_keyed_subjects(
    serve: Any, client: Any
) -> None:
    from nats.js import api

    await ensure_domain(client, "thing")
    old = api.ConsumerConfig(
        durable_name="old-listener_on_made",
        filter_subject="events.thing.made.v1",
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=30.0,
        max_deliver=6,
    )
    await client.js.add_consumer("EVENTS_THING", old)
    seen: list[int] = []
    service = Service("old-listener")

    @service.subscribe("thing.made.v1")
    async def on_made(event: Happened) -> None:
        seen.append(event.n)

    await serve(service)
    info = await client.js.consumer_info("EVENTS_THING", "old-listener_on_made")
    assert sorted(info.config.filter_subjects) == ["events.thing.made.v1", "events.thing.made.v1.>"]
    await client.publish("thing.made.v1", Happened(7), key="t-1")
    await eventually(lambda: seen == [7])


async def test_a_long_history_is_read_in_pages(client: Any) -> None:
    await ensure_domain(client, "thing")
    async with client.batch() as batch:
        for n in range(700):  # more than two pages of direct gets
            await batch.publish("thing.moved.v1", Happened(n), key="busy")
            await batch.publish("thing.moved.v1", Happened(-1), key="other")
    history = await client.history("thing", "busy")
    assert [r.decode(Happened).n for r in history] == list(range(700))
    assert [r.decode(Happened).n for r in await client.history("thing", "busy", limit=300)] == list(
        range(300)
    )


async def test_an_unkeyed_event_is_not_mistaken_for_a_key(client: Any) -> None:
    """`events.shop.order.created.v1` (unkeyed, 3-token type in domain shop) matches the
    filter of key `v1`'s 2-token types: it is not part of that key's history."""
    await ensure_domain(client, "shop")
    await client.publish("shop.order.created.v1", Happened(1))
    await client.publish("shop.paid.v1", Happened(2), key="v1")
    assert [(r.type, r.decode(Happened).n) for r in await client.history("shop", "v1")] == [
        ("shop.paid.v1", 2)
    ]


async def test_history_of_a_domain_without_a_stream_is_a_clear_error(client: Any) -> None:
    from framework import JetStreamError

    with pytest.raises(JetStreamError, match=r"no stream captures events\.nothing"):
        await client.history("nothing", "k")


async def test_history_needs_direct_gets_on_the_stream(client: Any) -> None:
    from nats.js import api

    from framework import JetStreamError

    await client.js.add_stream(api.StreamConfig(name="PLAIN", subjects=["events.plain.>"]))
    await client.publish("plain.made.v1", Happened(1), key="k")
    with pytest.raises(JetStreamError, match="stream PLAIN"):
        await client.history("plain", "k", timeout=1.0)
