"""The shop's saga at the service level: every path, against a real server.

Happy, out of stock, declined, timeout (the ADR-51 deadline), events out of order and
duplicate deliveries; after each, the stock invariants hold and the order's history
folds to the state `orders.get` answers.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import msgspec
import pytest
from support.shop import final

from framework import NotFound
from framework.testing import eventually
from services import inventory, notifications, orders, payments
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CREATED,
    PAYMENT_CAPTURED,
    PAYMENT_REFUNDED,
    STOCK_RESERVED,
    CreateOrder,
    CustomerOrders,
    CustomerQuery,
    DailyRevenue,
    GetOrder,
    GetPayment,
    GetStock,
    Order,
    OrderCancelled,
    OrderCreated,
    OrderHistory,
    OrderItem,
    Payment,
    PaymentCaptured,
    PaymentRefunded,
    Restock,
    RevenueQuery,
    StockItem,
    StockLine,
    StockReserved,
)


def basket(*lines: tuple[str, int, int], customer: str = "c-1") -> CreateOrder:
    return CreateOrder(customer, [OrderItem(sku, qty, price) for sku, qty, price in lines])


async def stock(client: Any, sku: str) -> StockItem:
    item: StockItem = await client.call("inventory.get", GetStock(sku), returns=StockItem)
    return item


async def assert_stock_invariants(client: Any) -> list[StockItem]:
    items = await client.call("inventory.list", returns=list[StockItem])
    for item in items:
        assert item.available >= 0, item
        assert item.reserved == sum(item.holds.values()), item
        assert item.available + item.reserved + item.sold == item.received, item
    return items


async def history_of(client: Any, order_id: str) -> OrderHistory:
    found: OrderHistory = await client.call(
        "orders.history", GetOrder(order_id), returns=OrderHistory
    )
    assert found.order == await client.call("orders.get", GetOrder(order_id), returns=Order)
    return found


async def settled(client: Any, sku: str) -> StockItem:
    """The SKU once no order holds it any more (every reservation decided)."""
    result: list[StockItem] = []

    async def no_holds() -> bool:
        result[:] = [await stock(client, sku)]
        return not result[0].holds

    await eventually(no_holds, 15, lambda: f"{sku} without holds: {result}")
    return result[0]


# --- the paths --------------------------------------------------------------------------


async def test_happy_path_reserves_charges_confirms_and_sells(client, shop, outbox, provider):
    before = await stock(client, "book-dune")
    order = await client.call("orders.create", basket(("book-dune", 3, 1_500)), returns=Order)
    assert order.status == "pending" and order.total_cents == 4_500
    confirmed = await final(client, order.id)
    assert confirmed.status == "confirmed" and confirmed.stock_reserved and confirmed.paid
    after = await settled(client, "book-dune")
    assert (after.available, after.sold) == (before.available - 3, before.sold + 3)
    assert provider.charged == {confirmed.payment_id: 4_500}
    await eventually(lambda: [n.kind for n in outbox.sent] == ["order_confirmed"])
    timeline = await history_of(client, order.id)
    types = [e.type for e in timeline.events]
    assert types[0] == "order.created.v1" and types[-1] == "order.confirmed.v1"
    assert sorted(types[1:3]) == ["order.paid.v1", "order.reserved.v1"]
    assert [e.sequence for e in timeline.events] == sorted(e.sequence for e in timeline.events)
    assert timeline.events[0].data["customer_id"] == "c-1"
    await eventually(lambda: stock_committed(client, order.id))
    await assert_stock_invariants(client)


async def stock_committed(client: Any, order_id: str) -> bool:
    return [r.type for r in await client.history("stock", order_id)] == [
        "stock.reserved.v1",
        "stock.committed.v1",
    ]


@pytest.mark.parametrize("sku", ["kite-red", "no-such-sku"])
async def test_out_of_stock_or_unknown_sku_cancels_and_refunds_or_voids(
    client, shop, outbox, provider, sku
):
    before = await stock(client, "mug-owl")
    request = basket(("mug-owl", 2, 900), (sku, 1, 1_000))
    order = await client.call("orders.create", request, returns=Order)
    cancelled = await final(client, order.id)
    assert cancelled.status == "cancelled"
    assert cancelled.reason == f"out of stock: {sku}"
    assert await settled(client, "mug-owl") == before  # all or nothing: the mug is not held

    await eventually(lambda: compensated(client, order.id))  # refunded if it was charged
    payment = await client.call("payments.get", GetPayment(order.id), returns=Payment)
    assert set(provider.charged) == set(provider.refunded)
    if payment.status == "refunded":
        assert provider.refunded == {payment.id}
    await eventually(lambda: [n.kind for n in outbox.sent] == ["order_cancelled"])
    await assert_stock_invariants(client)


async def test_declined_payment_cancels_and_releases_the_stock(client, shop, outbox, provider):
    before = await stock(client, "lamp-arc")
    order = await client.call("orders.create", basket(("lamp-arc", 2, 90_000)), returns=Order)
    cancelled = await final(client, order.id)
    assert cancelled.status == "cancelled" and "above the limit" in (cancelled.reason or "")
    assert await settled(client, "lamp-arc") == before
    assert provider.charged == {}

    async def released_or_never_held() -> bool:
        types = [r.type for r in await client.history("stock", order.id)]
        return types in (["stock.reserved.v1", "stock.released.v1"], [])

    await eventually(released_or_never_held)
    await anyio.sleep(0.3)
    assert await released_or_never_held()
    await assert_stock_invariants(client)


async def test_the_deadline_cancels_an_order_stuck_without_payments(
    serve, client, outbox, provider, monkeypatch
):
    """Payments is down: the ADR-51 schedule fires after ORDER_TIMEOUT and cancels the
    order, inventory releases it; payments, back, never charges it."""
    monkeypatch.setattr(orders, "ORDER_TIMEOUT", 2.0)
    await serve(inventory.service)  # creates the order stream first, without schedules
    await serve(notifications.service)
    await serve(orders.service)
    before = await stock(client, "pen-ink")
    started = time.monotonic()
    order = await client.call("orders.create", basket(("pen-ink", 5, 300)), returns=Order)
    await eventually(lambda: stock_held(client, order.id))
    cancelled = await final(client, order.id, timeout=20)
    took = time.monotonic() - started
    assert cancelled.status == "cancelled"
    assert cancelled.reason == "not completed within 2s (saga deadline)"
    assert took >= 1.9, took  # not before the deadline
    assert await settled(client, "pen-ink") == before
    types = [e.type for e in (await history_of(client, order.id)).events]
    assert types == [
        "order.created.v1",
        "order.reserved.v1",
        "order.expired.v1",
        "order.cancelled.v1",
    ]
    await eventually(lambda: [n.kind for n in outbox.sent] == ["order_cancelled"])

    await serve(payments.service)  # back: order.created and order.cancelled wait for it

    await eventually(lambda: compensated(client, order.id))
    assert set(provider.charged) == set(provider.refunded)
    await anyio.sleep(0.5)
    assert (
        await client.call("orders.get", GetOrder(order.id), returns=Order)
    ).status == "cancelled"


async def compensated(client: Any, order_id: str) -> bool:
    """The order's payment is voided (never charged) or refunded."""
    try:
        payment = await client.call("payments.get", GetPayment(order_id), returns=Payment)
    except NotFound:  # payments has not seen the order yet
        return False
    return payment.status in ("voided", "refunded")


async def stock_held(client: Any, order_id: str) -> bool:
    return [r.type for r in await client.history("stock", order_id)] == ["stock.reserved.v1"]


async def test_a_final_order_leaves_no_deadline_behind(client, shop):
    order = await client.call("orders.create", basket(("mug-owl", 1, 100)), returns=Order)
    assert (await final(client, order.id)).status == "confirmed"
    left: dict[str, int] = {}

    async def no_deadline() -> bool:  # purged by the delivery that made it final, after
        info = await client.js.stream_info(
            orders.ORDER_STREAM, subjects_filter="events.order.deadline.>"
        )
        left.clear()
        left.update(info.state.subjects or {})
        return not info.state.subjects

    await eventually(no_deadline, 10, lambda: f"deadline schedules left: {left}")


# --- order of events and duplicates -----------------------------------------------------


@pytest.mark.parametrize("capture_first", [True, False])
async def test_stock_and_payment_may_come_in_either_order(serve, client, capture_first):
    """Only orders runs; the saga's events are published by the test, in either order."""
    await serve(orders.service)
    order = await client.call("orders.create", basket(("book-dune", 1, 700)), returns=Order)
    captured = (PAYMENT_CAPTURED, PaymentCaptured(order.id, "pay-x", 700))
    reserved = (STOCK_RESERVED, StockReserved(order.id, [StockLine("book-dune", 1)]))
    for event_type, event in [captured, reserved] if capture_first else [reserved, captured]:
        await client.publish(event_type, event, key=order.id)
        await anyio.sleep(0.2)  # the first one handled before the second arrives
    confirmed = await final(client, order.id)
    assert (confirmed.status, confirmed.payment_id) == ("confirmed", "pay-x")
    types = [e.type for e in (await history_of(client, order.id)).events]
    first, second = ("order.paid.v1", "order.reserved.v1")[:: 1 if capture_first else -1]
    assert types == ["order.created.v1", first, second, "order.confirmed.v1"]


async def test_a_refund_that_overtakes_its_capture_waits_for_it(serve, client):
    await serve(orders.service)
    order = await client.call("orders.create", basket(("book-dune", 1, 700)), returns=Order)
    refund = PaymentRefunded(order.id, "pay-x", 700, "changed my mind")
    await client.publish(PAYMENT_REFUNDED, refund, key=order.id)
    await anyio.sleep(0.5)  # not yet: the capture it follows was not seen
    assert [e.type for e in (await history_of(client, order.id)).events] == ["order.created.v1"]
    await client.publish(PAYMENT_CAPTURED, PaymentCaptured(order.id, "pay-x", 700), key=order.id)
    cancelled = await final(client, order.id)
    assert (cancelled.status, cancelled.refunded) == ("cancelled", True)
    assert cancelled.reason == "payment refunded: changed my mind"


async def test_a_cancellation_before_the_order_arrives_voids_stock_and_payment(
    serve, client, provider
):
    """inventory and payments see order.cancelled first: the late order.created
    reserves and charges nothing."""
    await serve(inventory.service)
    await serve(payments.service)
    before = await stock(client, "bike-road")
    cancelled = OrderCancelled("ord-early", "c-1", "changed my mind", 500)
    await client.publish(ORDER_CANCELLED, cancelled, key="ord-early")

    async def voided() -> bool:
        try:
            payment = await client.call("payments.get", GetPayment("ord-early"), returns=Payment)
        except NotFound:
            return False
        return payment.status == "voided"

    await eventually(voided)
    await anyio.sleep(0.3)  # inventory noted it too
    created = OrderCreated("ord-early", "c-1", 500, [OrderItem("bike-road", 1, 500)])
    await client.publish(ORDER_CREATED, created, key="ord-early")
    await anyio.sleep(1.0)
    assert await stock(client, "bike-road") == before
    assert provider.charged == {}
    assert await client.history("stock", "ord-early") == []
    assert [r.type for r in await client.history("payment", "ord-early")] == []


async def test_duplicate_deliveries_change_nothing_twice(client, shop, outbox, provider):
    """Every event of an order published again under new event ids (what a producer's
    retry without dedupe looks like), three times, at once: one reservation, one charge,
    one confirmation, one notification, counted once in the read model."""
    before = await stock(client, "pen-ink")
    order = await client.call("orders.create", basket(("pen-ink", 4, 250)), returns=Order)
    confirmed = await final(client, order.id)
    assert confirmed.status == "confirmed"
    await settled(client, "pen-ink")
    domains = ("order", "stock", "payment")
    originals = [r for d in domains for r in await client.history(d, order.id)]
    async with anyio.create_task_group() as tg:
        for copy in range(3):
            for record in originals:
                tg.start_soon(republish, client, record, copy)
    await anyio.sleep(2.0)  # every copy handled (or found handled)
    after = await settled(client, "pen-ink")
    assert (after.available, after.sold) == (before.available - 4, before.sold + 4)
    assert provider.charged == {confirmed.payment_id: 1_000}
    folded = (await history_of(client, order.id)).order  # copies fold to the same state
    assert msgspec.structs.replace(folded, version=confirmed.version) == confirmed
    for domain in domains:  # what the services wrote in reaction: each event once
        written = [
            r.type for r in await client.history(domain, order.id) if "-copy-" not in r.event_id
        ]
        assert sorted(written) == sorted(
            r.type for r in originals if r.subject.split(".")[1] == domain
        )
    assert [n.kind for n in outbox.sent] == ["order_confirmed"]
    spent = await client.call("orders.customer", CustomerQuery("c-1"), returns=CustomerOrders)
    assert (spent.orders, spent.spent_cents) == ({order.id: "confirmed"}, 1_000)
    [day] = await client.call("orders.revenue", RevenueQuery(), returns=list[DailyRevenue])
    assert (day.orders, day.revenue_cents) == (1, 1_000)
    await assert_stock_invariants(client)


async def republish(client: Any, record: Any, copy: int) -> None:
    """The stored event again, as a new message (a new id: dedupe does not catch it)."""
    headers = {"Nats-Msg-Id": f"{record.event_id}-copy-{copy}", "Event-Type": record.type}
    await client.nc.publish(record.subject, record.data, headers=headers)


async def test_scarce_stock_is_never_oversold(client, shop):
    """10 orders at once for 2 pianos (made cheap enough to pay for): 2 confirmed."""
    orders_placed = []
    async with anyio.create_task_group() as tg:

        async def place(n: int) -> None:
            request = basket(("piano-grand", 1, 50_000), customer=f"c-{n}")
            orders_placed.append(await client.call("orders.create", request, returns=Order))

        for n in range(10):
            tg.start_soon(place, n)
    finals = [await final(client, o.id) for o in orders_placed]
    assert Counter(o.status for o in finals) == {"confirmed": 2, "cancelled": 8}
    piano = await settled(client, "piano-grand")
    assert (piano.available, piano.reserved, piano.sold) == (0, 0, 2)
    await assert_stock_invariants(client)


async def test_restock_get_and_list(client, serve):
    await serve(inventory.service)
    kite = await client.call("inventory.restock", Restock("kite-red", 5), returns=StockItem)
    assert (kite.available, kite.received) == (5, 5)
    new = await client.call(
        "inventory.restock", Restock("yo-yo", 3, name="Yo-yo"), returns=StockItem
    )
    assert (new.name, new.available) == ("Yo-yo", 3)
    listed = await assert_stock_invariants(client)
    assert [i.sku for i in listed] == sorted(set(inventory.SEED_CATALOG) | {"yo-yo"})
    with pytest.raises(NotFound, match="no sku nope"):
        await client.call("inventory.get", GetStock("nope"), returns=StockItem)


def test_a_compensating_refund_keeps_why_the_order_was_cancelled() -> None:
    """The fold alone: a cancelled order's refund (its compensation) does not replace the
    cancellation's reason; a confirmed order's refund does, and makes it refunded."""
    from datetime import UTC, datetime

    from framework import EventRecord
    from services.contracts import OrderConfirmed, OrderPaid, OrderRefunded, OrderReserved

    def record(seq: int, event_type: str, payload: Any) -> EventRecord:
        data = msgspec.json.encode(payload)
        now = datetime.now(UTC)
        return EventRecord(event_type, "o-1", seq, now, f"events.{event_type}.o-1", "-", {}, data)

    created = record(1, "order.created.v1", OrderCreated("o-1", "c-1", 500, []))
    paid = record(2, "order.paid.v1", OrderPaid("o-1", "p-1", 500))
    refund = OrderRefunded("o-1", "p-1", 500, "order cancelled: out of stock: x", "c-1")
    cancelled = record(3, "order.cancelled.v1", OrderCancelled("o-1", "c-1", "out of stock: x"))
    order = orders.fold([created, paid, cancelled, record(4, "order.refunded.v1", refund)])
    assert order is not None
    assert (order.status, order.reason, order.refunded) == ("cancelled", "out of stock: x", True)
    reserved = record(3, "order.reserved.v1", OrderReserved("o-1"))
    confirmed = record(4, "order.confirmed.v1", OrderConfirmed("o-1", "c-1", "p-1", 500))
    later = OrderRefunded("o-1", "p-1", 500, "damaged", "c-1")
    order = orders.fold([created, paid, reserved, confirmed, record(5, "order.refunded.v1", later)])
    assert order is not None
    assert (order.status, order.reason, order.version) == ("refunded", "damaged", 5)
