"""A corpus of bad input, sent by a raw nats-py client to RPC endpoints and event subjects.

Every case must get a clear answer, a 400 (or 408) with a message for a request and a
dead letter with a reason for an event; no service may crash, and valid traffic right
after each batch must be unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import nats
import pytest

from framework import Context, InvalidName, PublishError, Service, ServiceError, list_dead_letters
from framework.dev.devserver import NatsServer
from framework.streams import stream_name_for_domain
from framework.testing import eventually as wait_until
from framework.transport.names import check_endpoint_name, check_service_name, check_token

EVENT = "order.created.v1"
EVENT_SUBJECT = "events.order.created.v1"


class Charge(msgspec.Struct):
    order_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    amount_cents: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]


class Receipt(msgspec.Struct):
    order_id: str
    status: str


class OrderCreated(msgspec.Struct):
    order_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    amount_cents: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]


VALID = b'{"order_id": "o-1", "amount_cents": 500}'


class Shop:
    """The service under attack: one RPC endpoint and one event subscriber."""

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.service = Service("shop", publishes=[EVENT])

        @self.service.rpc()
        async def charge(req: Charge, ctx: Context) -> Receipt:
            return Receipt(req.order_id, "captured")

        @self.service.rpc()
        async def sized(n: int) -> str:
            return "x" * n

        @self.service.subscribe(EVENT, max_deliver=2, backoff=[0.1], ack_wait=2.0)
        async def on_order_created(event: OrderCreated, ctx: Context) -> None:
            self.handled.append(ctx.event_id or "")


@pytest.fixture
async def shop(serve: Any) -> Shop:
    shop = Shop()
    await serve(shop.service)
    return shop


@pytest.fixture
async def raw(nats_url: str) -> Any:
    """A bare nats-py connection: sends exactly the bytes and headers we give it."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


async def raw_call(nc: Any, data: bytes, headers: dict[str, str] | None = None) -> Any:
    return await nc.request("shop.charge", data, headers=headers, timeout=2.0)


def reply_error(msg: Any) -> tuple[int, str]:
    headers = msg.headers or {}
    return int(headers.get("Nats-Service-Error-Code", "200")), headers.get("Nats-Service-Error", "")


async def assert_valid_traffic_works(client: Any, shop: Shop, tag: str) -> None:
    """A valid call answers and a valid event is handled, right after a bad batch."""
    receipt = await client.call("shop.charge", Charge(f"ok-{tag}", 1), returns=Receipt, timeout=2.0)
    assert receipt == Receipt(f"ok-{tag}", "captured")
    await client.publish(EVENT, OrderCreated(f"ok-{tag}", 1), event_id=f"valid-{tag}")
    await wait_until(lambda: f"valid-{tag}" in shop.handled, 5, f"valid event {tag}")


async def shop_instance(client: Any) -> str:
    """The id of the one running shop instance (polled: a busy machine answers late)."""
    found: list[Any] = []

    async def answered() -> bool:
        found[:] = await client.ping("shop", timeout=0.3)
        return len(found) == 1

    await wait_until(answered, 10, "shop to answer a ping")
    return str(found[0].id)


async def shop_stats(client: Any) -> Any:
    found: list[Any] = []

    async def answered() -> bool:
        found[:] = await client.stats("shop", timeout=0.3)
        return len(found) == 1

    await wait_until(answered, 10, "shop to answer $SRV.STATS")
    return found[0]


def with_amount(text: str) -> bytes:
    return b'{"order_id": "o-1", "amount_cents": ' + text.encode() + b"}"


# -- RPC ---------------------------------------------------------------------------------

# (case, body, headers, expected code, fragment of the expected message)
RPC_PAYLOADS: list[tuple[str, bytes, dict[str, str] | None, int, str]] = [
    ("malformed JSON", b'{"order_id": "o-1",', None, 400, "undecodable request"),
    ("not JSON", b"charge me", None, 400, "undecodable request"),
    ("trailing garbage", VALID + b" {}", None, 400, "trailing characters"),
    ("invalid UTF-8 outside a string", VALID + b"\xff", None, 400, "undecodable"),
    ("empty body", b"", None, 400, "empty request"),
    ("whitespace body", b"   ", None, 400, "undecodable request"),
    ("null", b"null", None, 400, "Expected `object`, got `null`"),
    ("array", b"[1, 2]", None, 400, "Expected `object`, got `array`"),
    ("string for int", with_amount('"500"'), None, 400, "Expected `int`, got `str`"),
    (
        "int for string",
        b'{"order_id": 1, "amount_cents": 5}',
        None,
        400,
        "Expected `str`, got `int`",
    ),
    ("float for int", with_amount("5.5"), None, 400, "Expected `int`, got `float`"),
    ("bool for int", with_amount("true"), None, 400, "Expected `int`, got `bool`"),
    (
        "missing field",
        b'{"order_id": "o-1"}',
        None,
        400,
        "missing required field `amount_cents`",
    ),
    ("empty object", b"{}", None, 400, "missing required field"),
    ("10**400", with_amount(str(10**400)), None, 400, "Expected `int` <= 1000000000"),
    ("1e400", with_amount("1e400"), None, 400, "Number out of range"),
    ("negative", with_amount("-5"), None, 400, "Expected `int` >= 1"),
    (
        "oversized string",
        b'{"order_id": "' + b"o" * 10_000 + b'", "amount_cents": 5}',
        None,
        400,
        "Expected `str` of length <= 64",
    ),
]

RPC_HEADERS: list[tuple[str, bytes, dict[str, str] | None, int, str]] = [
    (
        "oversized Correlation-Id",
        VALID,
        {"Correlation-Id": "c" * 2000},
        400,
        "Correlation-Id is longer than 1024",
    ),
    (
        "Correlation-Id with a space",
        VALID,
        {"Correlation-Id": "has space"},
        400,
        "Correlation-Id must be",
    ),
    (
        "Correlation-Id with a control character",
        VALID,
        {"Correlation-Id": "c\x01d"},
        400,
        "Correlation-Id contains control characters",
    ),
    (
        "Correlation-Id at the length limit plus one",
        VALID,
        {"Correlation-Id": "c" * 129},
        400,
        "Correlation-Id must be 1-128",
    ),
    ("oversized other header", VALID, {"X-Note": "n" * 5000}, 400, "X-Note is longer"),
    (
        "control character in another header",
        VALID,
        {"X-Note": "bell\x07"},
        400,
        "X-Note contains control characters",
    ),
    ("DEL in a header", VALID, {"X-Note": "del\x7f"}, 400, "control characters"),
    (
        "Causation-Id markup",
        VALID,
        {"Causation-Id": "<script>"},
        400,
        "Causation-Id must be",
    ),
    (
        "Idempotency-Key wildcard",
        VALID,
        {"Idempotency-Key": "key.*"},
        400,
        "Idempotency-Key must be",
    ),
    ("Deadline not a number", VALID, {"Deadline": "soon"}, 400, "epoch milliseconds"),
    ("Deadline float notation", VALID, {"Deadline": "1e12"}, 400, "epoch milliseconds"),
    ("Deadline negative", VALID, {"Deadline": "-5"}, 408, "deadline passed"),
    ("Deadline zero", VALID, {"Deadline": "0"}, 408, "deadline passed"),
    ("Deadline in the past", VALID, {"Deadline": "1000000000000"}, 408, "deadline passed"),
    # Accepted: clamped to 24 h ahead, ignored, or not the service's business.
    ("Deadline far in the future", VALID, {"Deadline": "9" * 15}, 200, ""),
    ("forged Nats-Msg-Id", VALID, {"Nats-Msg-Id": "forged id"}, 200, ""),
    ("garbage traceparent", VALID, {"traceparent": "not-a-traceparent"}, 200, ""),
    (
        "forged error headers in a request",
        VALID,
        {"Nats-Service-Error-Code": "500", "Nats-Service-Error": "x"},
        200,
        "",
    ),
]


@pytest.mark.parametrize("batch", [RPC_PAYLOADS, RPC_HEADERS], ids=["payloads", "headers"])
async def test_rpc_bad_input_gets_a_clear_error_and_the_service_survives(
    shop: Shop, raw: Any, client: Any, batch: list[Any]
) -> None:
    before = await shop_instance(client)
    wrong = []
    for case, body, headers, code, fragment in batch:
        msg = await raw_call(raw, body, headers)
        got_code, message = reply_error(msg)
        if got_code != code or fragment not in message:
            wrong.append(f"{case}: got {got_code} {message!r}, want {code} {fragment!r}")
        if code == 200 and got_code == 200:
            assert msgspec.json.decode(msg.data, type=Receipt).status == "captured"
    assert not wrong, "\n".join(wrong)
    assert await shop_instance(client) == before  # never restarted
    await assert_valid_traffic_works(client, shop, "rpc")
    stats = next(e for e in (await shop_stats(client)).endpoints if e.name == "charge")
    assert stats.num_errors == sum(1 for *_, code, _ in batch if code != 200)


async def test_rpc_errors_come_back_typed_through_the_framework_client(
    shop: Shop, client: Any
) -> None:
    with pytest.raises(ServiceError) as caught:
        await client.call("shop.charge", b'{"order_id": "o-1"}', timeout=2.0)
    assert caught.value.code == 400
    assert caught.value.service == "shop"
    assert "amount_cents" in caught.value.message
    with pytest.raises(ServiceError) as caught:
        await client.call("shop.charge", with_amount(str(10**400)), timeout=2.0)
    assert caught.value.code == 400


# These inputs raise something other than msgspec's errors or a ServiceError inside
# the endpoint (UnicodeDecodeError, RecursionError from msgspec; OverflowError from
# int/1000.0 in parse_deadline). The design says 400; without a catch-all they killed
# the worker pool and the whole service, with one they come back as a 500.
RPC_CRASHERS = [
    pytest.param(
        b'{"order_id": "\xff\xfe", "amount_cents": 5}',
        None,
        {400},
        id="invalid UTF-8 inside a string",
    ),
    pytest.param(
        b'{"order_id": "o-1", "amount_cents": 5, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
        {400},
        id="deeply nested JSON",
    ),
    # Numeric but absurd: clamped like any far-future deadline (200), or refused (400).
    pytest.param(VALID, {"Deadline": "9" * 400}, {200, 400}, id="400-digit Deadline"),
]


@pytest.mark.parametrize(("body", "headers", "codes"), RPC_CRASHERS)
async def test_rpc_input_that_crashes_the_service_today(
    shop: Shop,
    raw: Any,
    client: Any,
    body: bytes,
    headers: dict[str, str] | None,
    codes: set[int],
) -> None:
    try:
        msg = await raw.request("shop.charge", body, headers=headers, timeout=1.0)
    except nats.errors.TimeoutError:
        pytest.fail("no answer: the endpoint died")
    assert reply_error(msg)[0] in codes, reply_error(msg)
    await assert_valid_traffic_works(client, shop, "after-crasher")


# -- events ----------------------------------------------------------------------------

# (case, body, headers, expected dead-letter reason; None: handled like a valid event)
EVENT_CASES: list[tuple[str, bytes, dict[str, str], str | None]] = [
    ("malformed JSON", b'{"order_id": "o-1",', {}, "undecodable"),
    ("wrong type", b'{"order_id": 1, "amount_cents": 5}', {}, "undecodable"),
    ("missing field", b'{"order_id": "o-1"}', {}, "undecodable"),
    ("10**400", with_amount(str(10**400)), {}, "undecodable"),
    ("1e400", with_amount("1e400"), {}, "undecodable"),
    ("empty body", b"", {}, "undecodable"),
    ("null", b"null", {}, "undecodable"),
    ("invalid UTF-8 outside a string", VALID + b"\xff", {}, "undecodable"),
    ("Nats-Msg-Id with a space", VALID, {"Nats-Msg-Id": "forged id"}, "invalid_headers"),
    ("Nats-Msg-Id too long", VALID, {"Nats-Msg-Id": "m" * 300}, "invalid_headers"),
    ("Correlation-Id control char", VALID, {"Correlation-Id": "c\x01"}, "invalid_headers"),
    ("oversized header", VALID, {"X-Note": "n" * 5000}, "invalid_headers"),
    ("Causation-Id markup", VALID, {"Causation-Id": "<b>"}, "invalid_headers"),
    ("Replay-Of with a wildcard", VALID, {"Replay-Of": "e.*"}, "invalid_headers"),
    # Events carry no deadline: a forged one changes nothing.
    ("Deadline not a number", VALID, {"Deadline": "soon"}, None),
    ("Deadline negative", VALID, {"Deadline": "-5"}, None),
    ("Deadline 400 digits", VALID, {"Deadline": "9" * 400}, None),
]


async def test_bad_events_are_dead_lettered_with_a_reason_and_the_service_survives(
    shop: Shop, raw: Any, client: Any
) -> None:
    js = raw.jetstream()
    before = await shop_instance(client)
    expected: dict[int, tuple[str, str | None]] = {}  # stream seq -> (case, reason)
    for i, (case, body, headers, reason) in enumerate(EVENT_CASES):
        headers = {"Nats-Msg-Id": f"bad-{i}", **headers}
        ack = await js.publish(EVENT_SUBJECT, body, headers=headers)
        expected[ack.seq] = (case, reason)
    bad = {seq: v for seq, v in expected.items() if v[1] is not None}
    accepted = {f"bad-{i}" for i, (*_, r) in enumerate(EVENT_CASES) if r is None}

    async def all_dead_lettered() -> bool:
        letters = await list_dead_letters(client, service="shop")
        return len(letters) >= len(bad)

    await wait_until(all_dead_lettered, 10, "every bad event dead-lettered")
    await wait_until(lambda: accepted <= set(shop.handled), 5, "the accepted events")
    letters = {d.sequence: d for d in await list_dead_letters(client, service="shop")}
    wrong = [
        f"{case}: {letters[seq].reason if seq in letters else 'no dead letter'}, want {reason}"
        for seq, (case, reason) in bad.items()
        if seq not in letters or letters[seq].reason != reason
    ]
    assert not wrong, "\n".join(wrong)
    for seq in bad:
        assert letters[seq].error and letters[seq].error != "-"  # the reason says why
        assert letters[seq].attempts == 1  # dead-lettered at once, never retried
    assert set(shop.handled) == accepted  # the handler never saw a bad one
    assert await shop_instance(client) == before
    await assert_valid_traffic_works(client, shop, "events")
    data = (await shop_stats(client)).endpoints[-1].data
    assert data["dead_lettered"] == len(bad)


async def test_forged_event_id_of_a_handled_event_is_not_handled_again(
    shop: Shop, raw: Any, client: Any
) -> None:
    await client.publish(EVENT, OrderCreated("o-1", 5), event_id="evt-1")
    await wait_until(lambda: "evt-1" in shop.handled, 5, "the real event")
    forged = await raw.jetstream().publish(
        EVENT_SUBJECT,
        b'{"order_id": "o-evil", "amount_cents": 1}',
        headers={"Nats-Msg-Id": "evt-1"},
    )
    assert forged.duplicate  # the stream's dedupe window drops it
    await assert_valid_traffic_works(client, shop, "forged")
    assert shop.handled.count("evt-1") == 1


EVENT_CRASHERS = [
    pytest.param(
        b'{"order_id": "\xff\xfe", "amount_cents": 5}', id="invalid UTF-8 inside a string"
    ),
    pytest.param(
        b'{"order_id": "o-1", "amount_cents": 5, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        id="deeply nested JSON",
    ),
]


@pytest.mark.parametrize("body", EVENT_CRASHERS)
async def test_undecodable_event_that_escapes_the_decoder_today(
    shop: Shop, raw: Any, client: Any, body: bytes
) -> None:
    ack = await raw.jetstream().publish(EVENT_SUBJECT, body, headers={"Nats-Msg-Id": "crasher"})

    async def dead_lettered() -> bool:
        return bool(await list_dead_letters(client, service="shop"))

    await wait_until(dead_lettered, 1.5, "a dead letter")
    (letter,) = await list_dead_letters(client, service="shop")
    assert (letter.sequence, letter.reason) == (ack.seq, "undecodable")


# -- subjects built from user input -----------------------------------------------------------

HOSTILE_TOKENS = ["*", ">", "a.b", ".", "a b", " ", "", "a\tb", "a\nb", "a*", "orders.>", "ä"]


@pytest.mark.parametrize("token", HOSTILE_TOKENS)
def test_check_token_refuses_subject_syntax_in_user_input(token: str) -> None:
    with pytest.raises(InvalidName):
        check_token(token, "order id")


@pytest.mark.parametrize("token", ["o-1", "ORDER_42", "a" * 64])
def test_check_token_accepts_plain_tokens(token: str) -> None:
    assert check_token(token) == token


@pytest.mark.parametrize("token", ["*", ">", "a b", "", ".", "a..b", "a\tb", "x" * 300])
async def test_call_refuses_a_subject_with_wildcards_spaces_or_empty_tokens(
    client: Any, token: str
) -> None:
    with pytest.raises(InvalidName):
        await client.call(f"shop.{token}", VALID, timeout=1.0)


async def test_a_dot_in_user_input_is_caught_by_check_token_not_by_the_subject(
    shop: Shop, client: Any
) -> None:
    # "shop.charge" built from a user's "charge" is fine; "charge.x" makes another,
    # perfectly valid subject: only check_token on the token itself catches the dot.
    assert (await client.call(f"shop.{check_token('charge')}", VALID, timeout=2.0))["status"]
    with pytest.raises(InvalidName):
        await client.call(f"shop.{check_token('charge.x')}", VALID, timeout=2.0)


@pytest.mark.parametrize("user", ["*", ">", "a b", "Created", "", "a.b.c"])
async def test_publish_refuses_event_types_built_from_hostile_input(client: Any, user: str) -> None:
    with pytest.raises(InvalidName):
        await client.publish(f"order.{user}.v1", {"order_id": "o-1", "amount_cents": 1})


@pytest.mark.parametrize("name", ["sh*p", "shop.x", "shop >", "", "a" * 65])
def test_service_endpoint_and_domain_names_refuse_subject_syntax(name: str) -> None:
    with pytest.raises(InvalidName):
        check_service_name(name)
    with pytest.raises(InvalidName):
        check_endpoint_name(name)
    with pytest.raises(InvalidName):
        stream_name_for_domain(name)
    with pytest.raises(InvalidName):
        Service(name)
    if name:  # an empty endpoint name falls back to the function's name
        with pytest.raises(InvalidName):

            @Service("ok").rpc(name)
            async def handler() -> None: ...


# -- payload size ----------------------------------------------------------------------------


async def test_payload_over_max_payload_is_refused_at_once_and_nothing_breaks(
    shop: Shop, client: Any
) -> None:
    huge = b'{"order_id": "' + b"o" * (2 * 1024 * 1024) + b'", "amount_cents": 5}'
    assert len(huge) > client.nc.max_payload
    started = time.monotonic()
    with pytest.raises(Exception, match=r"(?i)payload") as caught:
        await client.call("shop.charge", huge, timeout=2.0)
    assert time.monotonic() - started < 0.5  # refused client-side, not a timeout
    # nats-py's MaxPayloadError today; a framework error type would be at least as clear.
    assert isinstance(caught.value, ServiceError | nats.errors.MaxPayloadError)
    with pytest.raises(PublishError, match=r"(?i)max(imum)?[ _]payload"):
        await client.publish(EVENT, huge)
    assert not client.nc.is_closed
    await assert_valid_traffic_works(client, shop, "payload")


async def test_raw_protocol_client_over_max_payload_is_cut_off_alone(
    shop: Shop, nats_server: NatsServer, client: Any
) -> None:
    """A client that ignores max_payload (not nats-py) is disconnected; nobody else is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", nats_server.port)
    try:
        assert (await reader.readline()).startswith(b"INFO ")
        size = 2 * 1024 * 1024
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\n')
        writer.write(f"PUB shop.charge {size}\r\n".encode() + b"x" * size + b"\r\n")
        answer = b""
        with anyio.fail_after(5):
            try:
                await writer.drain()
                while chunk := await reader.read(4096):  # until the server hangs up
                    answer += chunk
            except ConnectionError:  # reset before (or while) the -ERR was read
                pass
        logged = "maximum payload" in nats_server.log_tail(50).lower()
        assert b"Maximum Payload" in answer or logged, (answer, nats_server.log_tail(10))
    finally:
        writer.close()
    await assert_valid_traffic_works(client, shop, "raw-protocol")


@contextlib.asynccontextmanager
async def small_server_shop(tmp_path: Path) -> AsyncIterator[tuple[Shop, Any]]:
    """A server with max_payload 4096 (a config file: there is no flag), the shop on it.

    Entered in the test itself: a service's task group must be left in the task that
    entered it, which an async fixture does not guarantee.
    """
    from framework import connect

    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 4096\n")
    with NatsServer(config_file=conf, store_dir=tmp_path / "js") as server:
        shop = Shop()
        async with shop.service.serve(server.url), connect(server.url) as client:
            assert client.nc.max_payload == 4096
            yield shop, client


async def test_small_max_payload_server_still_serves_messages_that_fit(tmp_path: Path) -> None:
    async with small_server_shop(tmp_path) as (shop, client):
        assert await client.call("shop.sized", 3000, returns=str, timeout=2.0) == "x" * 3000
        with pytest.raises(ServiceError) as caught:
            await client.call(
                "shop.charge", {"order_id": "y" * 3900, "amount_cents": 1}, timeout=2.0
            )
        assert caught.value.code == 400  # too long for the field, but it arrived and was judged
        await assert_valid_traffic_works(client, shop, "small")


async def test_reply_over_max_payload_is_an_error_not_a_timeout(tmp_path: Path) -> None:
    async with small_server_shop(tmp_path) as (_, client):
        started = time.monotonic()
        with pytest.raises(ServiceError) as caught:
            await client.call("shop.sized", 10_000, returns=str, timeout=1.0)
        assert caught.value.code != 408, caught.value
        assert time.monotonic() - started < 1.0


async def test_event_pushed_over_max_payload_by_its_headers_keeps_the_connection(
    tmp_path: Path,
) -> None:
    async with small_server_shop(tmp_path) as (shop, client):
        body = {"order_id": "o-1", "amount_cents": 1, "pad": "p" * 3950}  # fits alone
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"(?i)payload"):
            await client.publish(EVENT, body, timeout=1.0)
        assert time.monotonic() - started < 0.5
        assert not client.nc.is_closed
        await assert_valid_traffic_works(client, shop, "headers-over")


async def test_batched_event_pushed_over_max_payload_by_its_headers_keeps_the_connection(
    tmp_path: Path,
) -> None:
    async with small_server_shop(tmp_path) as (shop, client):
        body = {"order_id": "o-1", "amount_cents": 1, "pad": "p" * 3950}  # fits alone
        async with client.batch(timeout=2.0) as batch:
            await batch.publish(EVENT, {"order_id": "o-0", "amount_cents": 1})
            with pytest.raises(PublishError, match=r"(?i)payload"):
                await batch.publish(EVENT, body)
            await batch.publish(EVENT, {"order_id": "o-2", "amount_cents": 1})
        assert len(batch.acks) == 2 and not batch.failures  # the others were stored
        assert not client.nc.is_closed
        await assert_valid_traffic_works(client, shop, "batch-headers-over")


async def test_undecodable_event_near_max_payload_is_dead_lettered(tmp_path: Path) -> None:
    async with small_server_shop(tmp_path) as (shop, client):
        body = b'{"order_id": 5, "pad": "' + b"p" * 3950 + b'"}'
        ack = await client.js.publish(EVENT_SUBJECT, body, headers={"Nats-Msg-Id": "near-limit"})

        async def dead_lettered() -> bool:
            return bool(await list_dead_letters(client, service="shop"))

        await wait_until(dead_lettered, 1.5, "the dead letter")
        (letter,) = await list_dead_letters(client, service="shop")
        assert (letter.sequence, letter.reason) == (ack.seq, "undecodable")
        assert shop.service.client is not None and not shop.service.client.nc.is_closed
