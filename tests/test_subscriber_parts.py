"""A subscriber's options and the typed values its parts pass: no server needed."""

from __future__ import annotations

import dataclasses
import inspect

import msgspec
import pytest

from framework import Service
from framework.events.delivery import AckInfo, parse_ack_subject
from framework.events.options import DEFAULT_BACKOFF, SUBSCRIBE_DEFAULTS, SubscribeOptions


class Created(msgspec.Struct):
    order_id: str


OPTION_NAMES = [f.name for f in dataclasses.fields(SubscribeOptions)]


def test_the_decorator_takes_exactly_the_options_with_their_defaults() -> None:
    parameters = inspect.signature(Service.subscribe).parameters
    keywords = {n: p.default for n, p in parameters.items() if n not in ("self", "event_type")}
    assert keywords.pop("name") is None
    assert keywords == {n: getattr(SUBSCRIBE_DEFAULTS, n) for n in OPTION_NAMES}
    assert SUBSCRIBE_DEFAULTS.backoff == DEFAULT_BACKOFF == (1.0, 5.0, 15.0, 60.0)
    assert (SUBSCRIBE_DEFAULTS.max_deliver, SUBSCRIBE_DEFAULTS.max_concurrency) == (5, 16)


def test_the_decorator_documents_every_option() -> None:
    doc = inspect.getdoc(Service.subscribe) or ""
    missing = [n for n in ["name", *OPTION_NAMES] if f"- `{n}` (" not in doc]
    assert missing == []


def test_a_declared_subscriber_carries_the_options_it_was_given() -> None:
    svc = Service("opts")

    @svc.subscribe("order.created.v1", max_deliver=3, backoff=[0.5], deliver="new")
    async def on_created(event: Created) -> None: ...

    options = svc.subscribers[0].options
    assert options == SubscribeOptions(max_deliver=3, backoff=(0.5,), deliver="new")
    assert options.ack_wait == 30.0 and options.idempotent is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_deliver = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_deliver", 0),
        ("max_concurrency", 0),
        ("deliver", "old"),
        ("backoff", [1.0, -1.0]),
        ("backoff", [float("inf")]),
        ("ack_wait", 0),
        ("max_processing_time", 0),
        ("max_processing_time", float("nan")),
        ("idempotency_ttl", -1.0),
        ("max_ack_pending", 0),
    ],
)
def test_an_option_out_of_bounds_fails_where_it_is_declared(option: str, value: object) -> None:
    svc = Service("opts")
    with pytest.raises(ValueError, match=option):
        svc.subscribe("order.created.v1", **{option: value})  # type: ignore[arg-type]
    assert svc.subscribers == []


def test_backoff_repeats_its_last_delay_and_empty_means_at_once() -> None:
    options = SubscribeOptions(backoff=[1, 5])
    assert options.backoff == (1.0, 5.0)
    assert [options.retry_delay(attempt) for attempt in (1, 2, 3, 9)] == [1.0, 5.0, 5.0, 5.0]
    assert SubscribeOptions(backoff=()).retry_delay(3) == 0.0


def test_max_ack_pending_defaults_to_a_multiple_of_max_concurrency() -> None:
    assert SubscribeOptions().ack_pending_limit == 1000
    assert SubscribeOptions(max_concurrency=500).ack_pending_limit == 2000
    assert SubscribeOptions(max_ack_pending=10).ack_pending_limit == 10


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.EVENTS_ORDER.svc_h.3.41.40.1700000000000000000.7", ("EVENTS_ORDER", 3, 41, 7)),
        (
            "$JS.ACK.hub.ACCHASH.EVENTS_ORDER.svc_h.1.2.2.1700000000000000000.0",
            ("EVENTS_ORDER", 1, 2, 0),
        ),
        (
            "$JS.ACK.hub.ACCHASH.EVENTS_ORDER.svc_h.1.2.2.1700000000000000000.0.tok",
            ("EVENTS_ORDER", 1, 2, 0),
        ),
        ("$JS.ACK.EVENTS_ORDER.svc_h.x.41.40.17.7", None),
        ("_INBOX.abc", None),
    ],
)
def test_an_ack_subject_reads_as_stream_attempt_sequence_and_lag(
    reply: str, expected: tuple[str, int, int, int] | None
) -> None:
    info = parse_ack_subject(reply)
    assert (None if info is None else (info.stream, info.attempt, info.sequence, info.pending)) == (
        expected
    )
    assert info is None or isinstance(info, AckInfo)
