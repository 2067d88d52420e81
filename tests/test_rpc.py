"""Request-reply endpoints against a real nats-server."""

from __future__ import annotations

import time

import anyio
import msgspec
import nats
import pytest
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

from framework import (
    BadRequest,
    Context,
    DeadlineExceeded,
    InvalidName,
    NoResponders,
    NotFound,
    RemoteError,
    Service,
    ServiceError,
)
from framework.transport.headers import CORRELATION_ID, DEADLINE, ERROR, ERROR_CODE


class Charge(msgspec.Struct):
    order_id: str
    amount_cents: int


class Receipt(msgspec.Struct):
    payment_id: str
    status: str


def payments_service() -> Service:
    svc = Service("payments", version="1.2.3", description="Charges orders")

    @svc.rpc("charge")
    async def charge(req: Charge, ctx: Context) -> Receipt:
        if req.amount_cents <= 0:
            raise ServiceError(422, "amount_cents must be positive")
        return Receipt(payment_id=f"p-{req.order_id}", status="captured")

    @svc.rpc()
    async def explode(req: Charge) -> Receipt:
        raise RuntimeError("secret internal detail")

    return svc


async def test_call_returns_typed_result(serve, client):
    await serve(payments_service())
    receipt = await client.call("payments.charge", Charge("o-1", 500), returns=Receipt)
    assert receipt == Receipt(payment_id="p-o-1", status="captured")


async def test_handler_error_code_reaches_caller_typed(serve, client):
    await serve(payments_service())
    with pytest.raises(ServiceError) as info:
        await client.call("payments.charge", Charge("o-1", 0), returns=Receipt)
    assert (info.value.code, info.value.message, info.value.service) == (
        422,
        "amount_cents must be positive",
        "payments",
    )


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"{not json", "malformed"),
        (
            b'{"order_id": "o", "amount_cents": "five"}',
            "Expected `int`, got `str` - at `$.amount_cents`",
        ),
        (b'{"order_id": "o"}', "missing required field `amount_cents`"),
        (b"", "empty request: expected JSON for Charge"),
    ],
)
async def test_bad_payload_gets_400_with_validation_message(serve, client, payload, fragment):
    await serve(payments_service())
    with pytest.raises(BadRequest) as info:
        await client.call("payments.charge", payload, returns=Receipt)
    assert info.value.code == 400
    assert fragment in info.value.message


async def test_raising_handler_gets_500_without_traceback_and_service_survives(serve, client):
    await serve(payments_service())
    with pytest.raises(RemoteError) as info:
        await client.call("payments.explode", Charge("o", 1), returns=Receipt)
    assert info.value.code == 500
    assert "error id" in info.value.message
    assert "secret internal detail" not in info.value.message
    assert "Traceback" not in info.value.message
    assert await client.call("payments.charge", Charge("o-2", 1), returns=Receipt)


async def test_unserved_subject_raises_no_responders_quickly(client):
    started = time.monotonic()
    with pytest.raises(NoResponders) as info:
        await client.call("nobody.home", None, timeout=10)
    assert "nobody.home" in str(info.value)
    assert time.monotonic() - started < 5  # far below the 10 s timeout: not a timeout


async def test_unknown_endpoint_of_running_service_is_404(serve, client):
    await serve(payments_service())
    with pytest.raises(NotFound) as info:
        await client.call("payments.refund", Charge("o", 1))
    assert "payments.charge" in info.value.message


async def test_two_slow_calls_to_one_endpoint_overlap(serve, client):
    svc = Service("slow")
    inside = 0
    both_inside = anyio.Event()

    @svc.rpc()
    async def wait(req: int) -> int:
        nonlocal inside
        inside += 1
        if inside == 2:
            both_inside.set()
        with anyio.fail_after(5):  # a serialized endpoint never sees the second call
            await both_inside.wait()
        return req

    await serve(svc)
    results = []
    async with anyio.create_task_group() as tg:
        for n in (1, 2):

            async def one(n: int = n) -> None:
                results.append(await client.call("slow.wait", n, returns=int, timeout=10))

            tg.start_soon(one)
    assert sorted(results) == [1, 2]


async def test_max_concurrency_bounds_parallel_handlers(serve, client):
    svc = Service("bounded")
    current = peak = 0

    @svc.rpc(max_concurrency=2)
    async def work(req: int) -> int:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        await anyio.sleep(0.05)
        current -= 1
        return req

    await serve(svc)
    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(client.call, "bounded.work", n)
    assert peak == 2


async def test_slow_handler_does_not_block_other_endpoints(serve, client):
    svc = Service("mixed")
    release = anyio.Event()

    @svc.rpc()
    async def slow() -> str:
        await release.wait()
        return "slow"

    @svc.rpc()
    async def fast() -> str:
        return "fast"

    await serve(svc)
    async with anyio.create_task_group() as tg:
        slow_results: list[str] = []

        async def call_slow() -> None:
            slow_results.append(await client.call("mixed.slow", returns=str, timeout=10))

        for _ in range(3):
            tg.start_soon(call_slow)
        await anyio.sleep(0.1)
        assert await client.call("mixed.fast", returns=str, timeout=2) == "fast"
        release.set()
    assert slow_results == ["slow"] * 3


async def test_nested_call_propagates_correlation_id_and_smaller_deadline(serve, client):
    seen: dict[str, object] = {}
    front, back = Service("front"), Service("back")

    @back.rpc()
    async def inner(ctx: Context) -> str:
        seen["inner_correlation"] = ctx.correlation_id
        seen["inner_remaining"] = ctx.remaining()
        return "ok"

    @front.rpc()
    async def outer(ctx: Context) -> str:
        seen["outer_correlation"] = ctx.correlation_id
        seen["outer_remaining"] = ctx.remaining()
        await anyio.sleep(0.2)
        return await ctx.call("back.inner", returns=str)

    await serve(back)
    await serve(front)
    assert (
        await client.call("front.outer", returns=str, timeout=5, correlation_id="corr-42") == "ok"
    )
    assert seen["outer_correlation"] == seen["inner_correlation"] == "corr-42"
    outer_left, inner_left = seen["outer_remaining"], seen["inner_remaining"]
    assert isinstance(outer_left, float) and isinstance(inner_left, float)
    assert 0 < inner_left < outer_left <= 5


async def test_spent_deadline_is_not_sent_over_the_wire(serve, client):
    calls = 0
    back = Service("back")

    @back.rpc()
    async def inner() -> str:
        nonlocal calls
        calls += 1
        return "late"

    await serve(back)
    live = Context(client, service="t", handler="h", subject="t.h", correlation_id="c")
    assert await live.call("back.inner", returns=str) == "late"
    spent = Context(
        client,
        service="t",
        handler="h",
        subject="t.h",
        correlation_id="c",
        deadline=time.time() - 0.01,
    )
    with pytest.raises(DeadlineExceeded):
        await spent.call("back.inner", returns=str)
    assert calls == 1  # only the live call reached the service


async def test_handler_is_cancelled_at_the_callers_deadline(serve, nats_url):
    finished = False
    svc = Service("front")

    @svc.rpc()
    async def outer() -> str:
        nonlocal finished
        await anyio.sleep(2)
        finished = True
        return "done"

    await serve(svc)
    nc = await nats.connect(nats_url)
    try:
        deadline = str(int((time.time() + 0.2) * 1000))
        reply = await nc.request("front.outer", b"", timeout=3, headers={DEADLINE: deadline})
    finally:
        await nc.close()
    assert reply.headers[ERROR_CODE] == "408"
    assert not finished


async def test_request_past_its_deadline_gets_408(serve, nats_url):
    await serve(payments_service())
    nc = await nats.connect(nats_url)
    try:
        past = str(int((time.time() - 1) * 1000))
        reply = await nc.request(
            "payments.charge", b'{"order_id":"o","amount_cents":1}', headers={DEADLINE: past}
        )
    finally:
        await nc.close()
    assert reply.headers[ERROR_CODE] == "408"
    assert "deadline" in reply.headers[ERROR]


async def test_handler_over_deadline_gets_408(serve, client):
    svc = Service("sleepy")

    @svc.rpc()
    async def nap() -> str:
        await anyio.sleep(5)
        return "rested"

    await serve(svc)
    with pytest.raises(DeadlineExceeded):
        await client.call("sleepy.nap", returns=str, timeout=0.3)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (CORRELATION_ID, "x" * 200),
        (CORRELATION_ID, "has space"),
        ("X-Custom", "v" * 5000),
        (DEADLINE, "tomorrow"),
    ],
)
async def test_invalid_headers_get_400(serve, nats_url, header, value):
    await serve(payments_service())
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(
            "payments.charge", b'{"order_id":"o","amount_cents":1}', headers={header: value}
        )
    finally:
        await nc.close()
    assert reply.headers[ERROR_CODE] == "400"


async def test_correlation_id_created_when_missing(serve, client):
    svc = Service("corr")

    @svc.rpc()
    async def which(ctx: Context) -> str:
        return ctx.correlation_id

    await serve(svc)
    first = await client.call("corr.which", returns=str)
    second = await client.call("corr.which", returns=str)
    assert first and second and first != second


def test_invalid_names_are_refused_when_declared():
    with pytest.raises(InvalidName):
        Service("bad name")
    with pytest.raises(InvalidName):
        Service("a.b")
    svc = Service("ok")
    with pytest.raises(InvalidName):

        @svc.rpc("has.dot")
        async def handler() -> None: ...

    with pytest.raises(InvalidName):

        @svc.rpc("wild*")
        async def handler2() -> None: ...

    with pytest.raises(TypeError):

        @svc.rpc("sync")
        def not_async() -> None: ...  # type: ignore[arg-type]


async def test_client_refuses_wildcard_subjects(client):
    for subject in ("payments.*", "payments.>", "pay ments.x", "payments..x", ""):
        with pytest.raises(InvalidName):
            await client.call(subject)


async def test_handler_argument_shapes(serve, client):
    svc = Service("shapes")

    @svc.rpc()
    async def ctx_first(ctx: Context, n: int) -> int:
        return n + len(ctx.service)

    @svc.rpc()
    async def plain(n: int) -> int:
        return n * 2

    @svc.rpc()
    async def nothing() -> None:
        return None

    await serve(svc)
    assert await client.call("shapes.ctx_first", 1, returns=int) == 1 + len("shapes")
    assert await client.call("shapes.plain", 21, returns=int) == 42
    assert await client.call("shapes.nothing", returns=None) is None


async def test_discovery_answers_all_subject_forms_and_parses_with_nats_micro(serve, client):
    svc = payments_service()
    await serve(svc)
    await client.call("payments.charge", Charge("o", 1), returns=Receipt)
    with pytest.raises(ServiceError):
        await client.call("payments.charge", Charge("o", 0), returns=Receipt)
    with pytest.raises(RemoteError):
        await client.call("payments.explode", Charge("o", 1), returns=Receipt)
    nc = client.nc
    for subject in ("$SRV.PING", "$SRV.PING.payments", f"$SRV.PING.payments.{svc.instance_id}"):
        ping = ServicePing.from_dict(msgspec.json.decode((await nc.request(subject, b"")).data))
        assert (ping.name, ping.id, ping.version) == ("payments", svc.instance_id, "1.2.3")
        assert ping.type == "io.nats.micro.v1.ping_response"
    info = ServiceInfo.from_dict(
        msgspec.json.decode((await nc.request("$SRV.INFO.payments", b"")).data)
    )
    assert info.description == "Charges orders"
    charge = next(e for e in info.endpoints if e.name == "charge")
    assert (charge.subject, charge.queue_group) == ("payments.charge", "payments")
    request_schema = msgspec.json.decode(charge.metadata["request_schema"])
    assert "amount_cents" in request_schema["$defs"]["Charge"]["properties"]
    assert all(isinstance(v, str) for v in charge.metadata.values())
    stats = ServiceStats.from_dict(
        msgspec.json.decode((await nc.request(f"$SRV.STATS.payments.{svc.instance_id}", b"")).data)
    )
    by_name = {e.name: e for e in stats.endpoints}
    assert (by_name["charge"].num_requests, by_name["charge"].num_errors) == (2, 1)
    assert (by_name["explode"].num_requests, by_name["explode"].num_errors) == (1, 1)
    assert by_name["charge"].processing_time > 0
    assert by_name["charge"].average_processing_time == by_name["charge"].processing_time // 2
    assert by_name["charge"].last_error == "amount_cents must be positive"


async def test_discovery_client_returns_typed_results_for_every_instance(serve, client):
    await serve(payments_service())
    await serve(payments_service())
    other = Service("other")

    @other.rpc()
    async def hi() -> str:
        return "hi"

    await serve(other)
    pings = await client.ping(timeout=1.0)
    assert sorted(p.name for p in pings) == ["other", "payments", "payments"]
    infos = await client.info("payments")
    assert len(infos) == 2 and all(i.endpoints[0].subject == "payments.charge" for i in infos)
    stats = await client.stats("other")
    assert [s.name for s in stats] == ["other"]


async def test_replicas_share_load_through_the_queue_group(serve, client):
    first, second = payments_service(), payments_service()
    await serve(first)
    await serve(second)
    for n in range(40):
        await client.call("payments.charge", Charge(str(n), 1), returns=Receipt)
    counts = [s.endpoints[0].num_requests for s in await client.stats("payments")]
    assert sum(counts) == 40 and all(c > 0 for c in counts)


async def test_handlers_own_timeout_is_a_500_not_the_callers_deadline(serve, client):
    svc = Service("waits")

    @svc.rpc()
    async def upstream() -> str:
        raise TimeoutError("the upstream API did not answer")

    await serve(svc)
    with pytest.raises(RemoteError):  # 500: the caller's deadline (5 s) has not passed
        await client.call("waits.upstream", returns=str, timeout=5)


async def test_calls_share_one_inbox_subscription_and_leave_nothing_behind(serve, client):
    svc = Service("slowpoke")

    @svc.rpc("wait")
    async def wait(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "done"

    await serve(svc)
    mux = await client.mux()
    subscriptions = len(client.nc._subs)
    sent = mux.requests
    results = []

    async def call(seconds: float) -> None:
        try:
            results.append(await client.call("slowpoke.wait", seconds, timeout=0.3))
        except DeadlineExceeded:
            results.append("timed out")

    async with anyio.create_task_group() as tg:
        for seconds in (0.0, 0.01, 1.0, 1.0):
            tg.start_soon(call, seconds)
    assert sorted(results) == ["done", "done", "timed out", "timed out"]
    with pytest.raises(NoResponders):
        await client.call("nobody.home", None, timeout=1)
    assert mux.requests - sent == 5 + 1  # the calls and the no-responders INFO lookup
    assert len(client.nc._subs) == subscriptions  # no subscription per call
    assert not mux._pending  # answered, timed out or refused: all forgotten
    assert not len(mux._timeouts)  # and no deadline is watched any more
    assert not client.nc._resp_map  # nats-py's own request map was never used
