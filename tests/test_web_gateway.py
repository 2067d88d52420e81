"""The sample HTTP edge (services/gateway.py) over real HTTP, in front of the real shop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from support.shop import Outbox, SlowProvider, serve_shop
from web_support import Frame, http_server, read_frames

from services import payments

ORDER = {
    "customer_id": "alice",
    "items": [{"sku": "book-dune", "quantity": 2, "unit_price_cents": 999}],
}


@pytest_asyncio.fixture
async def http(
    serve: Any, nats_url: str, outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setattr(payments, "provider", SlowProvider(0.5))  # the stream opens first
    await serve_shop(serve)
    monkeypatch.setenv("NATS_URL", nats_url)
    from services import gateway

    async with http_server(gateway.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as c:
        yield c


async def frames_until_end(http: httpx.AsyncClient, url: str, limit: float = 15) -> list[Frame]:
    frames: list[Frame] = []
    async with asyncio.timeout(limit), http.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for frame in read_frames(response):
            frames.append(frame)
            if frame.event == "end":
                break
    return frames


async def test_post_order_answers_202_with_id_and_urls(http: httpx.AsyncClient) -> None:
    reply = await http.post("/orders", json=ORDER)
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["id"].startswith("ord-")
    assert body["status"] == "pending"
    assert body["status_url"] == f"/orders/{body['id']}"
    assert reply.headers["location"] == body["status_url"]
    assert reply.headers["x-request-id"]

    order = (await http.get(body["status_url"])).json()
    assert order["id"] == body["id"]
    assert order["total_cents"] == 1998


async def test_order_events_stream_from_created_to_confirmed(http: httpx.AsyncClient) -> None:
    placed = (await http.post("/orders", json=ORDER)).json()
    frames = await frames_until_end(http, placed["events_url"])

    events = [f.event for f in frames]
    assert events[0] == "order" and events[-2:] == ["order.confirmed.v1", "end"]
    # the shop's saga in between, as it happened: the (slow) capture last, noted by orders;
    # inventory's reservation may be over before the stream opens
    assert events[-4:-2] == ["payment.captured.v1", "order.paid.v1"], events
    assert set(events[1:-4]) <= {"stock.reserved.v1", "order.reserved.v1"}, events
    assert json.loads(frames[0].data)["status"] == "pending"
    assert frames[0].id == f"{placed['id']}-now"
    confirmed = json.loads(frames[-2].data)
    assert confirmed["order_id"] == placed["id"]
    assert frames[-2].id == f"{placed['id']}-confirmed"  # the event id: Last-Event-ID
    assert frames[-1].data == "{}"


async def test_a_declined_order_streams_until_cancelled(http: httpx.AsyncClient) -> None:
    expensive = {
        **ORDER,
        "items": [{"sku": "piano-grand", "quantity": 1, "unit_price_cents": 500_000}],
    }
    placed = (await http.post("/orders", json=expensive)).json()
    frames = await frames_until_end(http, placed["events_url"])
    assert [f.event for f in frames][-2:] == ["order.cancelled.v1", "end"]


async def test_events_of_a_final_order_are_its_state_and_end(http: httpx.AsyncClient) -> None:
    placed = (await http.post("/orders", json=ORDER)).json()
    await frames_until_end(http, placed["events_url"])
    again = await frames_until_end(http, placed["events_url"])
    assert [f.event for f in again] == ["order", "end"]
    assert json.loads(again[0].data)["status"] == "confirmed"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"customer_id": "a", "items": []}, 422, "items"),
        ({"customer_id": "a b", "items": ORDER["items"]}, 422, "customer_id"),
        (
            {"customer_id": "a", "items": [{"sku": "x", "quantity": 1, "unit_price_cents": 0}]},
            422,
            "total is 0",
        ),
    ],
)
async def test_invalid_orders_are_422_with_the_services_message(
    http: httpx.AsyncClient, body: dict[str, Any], status: int, message: str
) -> None:
    reply = await http.post("/orders", json=body)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error["message"]
    assert error["mesh_code"] == 400
    assert error["service"] == "orders"


async def test_malformed_json_is_422_not_500(http: httpx.AsyncClient) -> None:
    reply = await http.post(
        "/orders", content=b'{"customer_id": ', headers={"content-type": "application/json"}
    )
    assert reply.status_code == 422
    assert "JSON" in reply.json()["error"]["message"]


async def test_a_body_that_is_not_an_object_is_422(http: httpx.AsyncClient) -> None:
    reply = await http.post("/orders", json=[1, 2, 3])
    assert reply.status_code == 422


async def test_an_oversized_body_is_413(http: httpx.AsyncClient) -> None:
    huge = {"customer_id": "a", "items": [], "pad": "x" * (2 * 1024 * 1024)}
    reply = await http.post("/orders", json=huge)
    assert reply.status_code == 413
    assert "larger than" in reply.json()["error"]["message"]


async def test_an_oversized_chunked_body_is_413(http: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    reply = await http.post(
        "/orders", content=chunks(), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413


async def test_unknown_order_is_404_for_get_and_for_events(http: httpx.AsyncClient) -> None:
    reply = await http.get("/orders/ord-nope")
    assert reply.status_code == 404
    assert "no order ord-nope" in reply.json()["error"]["message"]
    events = await http.get("/orders/ord-nope/events")
    assert events.status_code == 404
    assert events.headers["content-type"].startswith("application/json")


async def test_an_id_that_is_not_an_id_is_422(http: httpx.AsyncClient) -> None:
    reply = await http.get("/orders/" + "x" * 100)
    assert reply.status_code == 422


async def test_nothing_serving_orders_is_503(monkeypatch: pytest.MonkeyPatch) -> None:
    from framework.dev.devserver import NatsServer
    from services import gateway

    with NatsServer() as empty:  # a mesh where no service runs
        monkeypatch.setenv("NATS_URL", empty.url)
        async with http_server(gateway.app) as base, httpx.AsyncClient(base_url=base) as c:
            reply = await c.post("/orders", json=ORDER)
    assert reply.status_code == 503
    assert "no responders" in reply.json()["error"]["message"]


async def test_request_id_is_echoed_and_becomes_the_correlation_id(
    http: httpx.AsyncClient, client: Any
) -> None:
    seen: list[str] = []
    # (the shop keys its events by order id: events.order.created.v1.<order_id>)
    sub = await client.nc.subscribe("events.order.created.v1.>", cb=_collect(seen))
    await client.nc.flush()
    reply = await http.post("/orders", json=ORDER, headers={"X-Request-Id": "req-42"})
    assert reply.headers["x-request-id"] == "req-42"
    from framework.testing import eventually

    await eventually(lambda: bool(seen))
    await sub.unsubscribe()
    assert seen == ["req-42"]


def _collect(seen: list[str]) -> Any:
    async def on_message(msg: Any) -> None:
        seen.append((msg.headers or {}).get("Correlation-Id", ""))

    return on_message


async def test_an_invalid_request_id_is_400(http: httpx.AsyncClient) -> None:
    reply = await http.post("/orders", json=ORDER, headers={"X-Request-Id": "bad id with spaces"})
    assert reply.status_code == 400
    assert "X-Request-Id" in reply.json()["error"]["message"]


async def test_leaving_an_order_stream_unsubscribes_its_watch(http: httpx.AsyncClient) -> None:
    from services import gateway

    placed = (await http.post("/orders", json=ORDER)).json()
    subscriptions = len(gateway.edge.client.nc._subs)
    async with http.stream("GET", placed["events_url"]) as response:
        async for frame in read_frames(response):
            assert frame.event == "order"
            assert len(gateway.edge.client.nc._subs) > subscriptions  # watching
            break  # leave before the order is final
    from framework.testing import eventually

    await eventually(lambda: len(gateway.edge.client.nc._subs) == subscriptions)


async def test_one_trace_from_the_http_request_to_the_notification(
    http: httpx.AsyncClient, spans: Any
) -> None:
    from framework.testing import eventually

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    traceparent = f"00-{trace_id}-b7ad6b7169203331-01"
    placed = await http.post("/orders", json=ORDER, headers={"traceparent": traceparent})
    assert placed.status_code == 202

    def names() -> set[str]:
        return {
            s.name for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
        }

    await eventually(
        lambda: "process events.order.confirmed.v1" in names(),
        what=lambda: f"the notification's span in the trace (have {sorted(names())})",
    )
    expected = {
        "POST /orders",
        "request orders.create",
        "process orders.create",
        "publish events.order.created.v1",
        "process events.order.created.v1",
        "process events.payment.captured.v1",
    }
    # (the shop's handler that confirms goes on, to enqueue the receipt: its span ends later)
    await eventually(lambda: expected <= names(), what=lambda: f"{expected - names()} in the trace")
    assert expected <= names()
