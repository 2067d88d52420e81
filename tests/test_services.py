"""The sample mesh (orders, payments, inventory, notifications) in-process against a real
server. The saga's own paths (out of stock, timeout, events out of order) are in
tests/test_shop_saga.py."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
from support.shop import order_when

from framework import BadRequest, NotFound, ServiceError, list_dead_letters, replay_dead_letter
from framework.runner import load_service
from framework.testing import eventually
from services import notifications, orders, payments
from services.contracts import (
    ORDER_CREATED,
    PAYMENT_FAILED,
    CreateOrder,
    GetOrder,
    GetPayment,
    ListOrders,
    Order,
    OrderCreated,
    OrderItem,
    Payment,
    PaymentFailed,
    Refund,
)


async def order_reaches(client: Any, order_id: str, status: str) -> Order:
    return await order_when(client, order_id, lambda order: order.status == status, 10)


def order_of(cents: int, customer: str = "c-1", **options: Any) -> CreateOrder:
    return CreateOrder(customer, [OrderItem("book-dune", 2, cents // 2)], **options)


async def test_order_is_confirmed_and_customer_notified_once(shop, client, outbox, provider):
    order = await client.call("orders.create", order_of(5000), returns=Order)
    assert (order.status, order.total_cents) == ("pending", 5000)

    confirmed = await order_reaches(client, order.id, "confirmed")
    assert confirmed.payment_id is not None
    await eventually(lambda: len(outbox.sent) == 1)
    await anyio.sleep(0.5)  # nothing else arrives
    [note] = outbox.sent
    assert (note.kind, note.order_id, note.customer_id) == ("order_confirmed", order.id, "c-1")
    assert "50.00" in note.message
    assert provider.charged == {confirmed.payment_id: 5000}


async def test_large_amount_is_declined_and_order_cancelled(shop, client, outbox, provider):
    order = await client.call("orders.create", order_of(250_000), returns=Order)
    cancelled = await order_reaches(client, order.id, "cancelled")
    assert cancelled.reason is not None and "above the limit" in cancelled.reason
    payment = await client.call("payments.get", GetPayment(order.id), returns=Payment)
    assert payment.status == "declined"
    await eventually(lambda: len(outbox.sent) == 1)
    assert outbox.sent[0].kind == "order_cancelled"
    assert provider.charged == {}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"customer_id": "c-1", "items": []}, "at `$.items`"),
        (
            {"customer_id": "c-1", "items": [{"sku": "a", "quantity": 0, "unit_price_cents": 1}]},
            "at `$.items[0].quantity`",
        ),
        (
            {"customer_id": "c-1", "items": [{"sku": "a", "quantity": 1, "unit_price_cents": -5}]},
            "at `$.items[0].unit_price_cents`",
        ),
        ({"items": [{"sku": "a", "quantity": 1, "unit_price_cents": 5}]}, "customer_id"),
        (
            {
                "customer_id": "c-1",
                "items": [
                    {"sku": "a", "quantity": 1, "unit_price_cents": 5},
                    {"sku": "a", "quantity": 2, "unit_price_cents": 5},
                ],
            },
            "sku 'a' is listed twice",
        ),
        (
            {"customer_id": "c-1", "items": [{"sku": "a", "quantity": 3, "unit_price_cents": 0}]},
            "order total is 0",
        ),
        (
            {
                "customer_id": "c-1",
                "items": [{"sku": "a", "quantity": 1000, "unit_price_cents": 1_000_000}],
            },
            "above the limit of 10000000 cents",
        ),
    ],
)
async def test_invalid_orders_are_bad_requests(serve, client, payload, message):
    await serve(orders.service)
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("$", r"\$")):
        await client.call("orders.create", payload, returns=Order)


async def test_unknown_order_and_payment_are_not_found(serve, client):
    await serve(orders.service)
    await serve(payments.service)
    with pytest.raises(NotFound, match="no order ord-missing"):
        await client.call("orders.get", GetOrder("ord-missing"), returns=Order)
    with pytest.raises(NotFound, match="no payment for order ord-missing"):
        await client.call("payments.get", GetPayment("ord-missing"), returns=Payment)


async def test_duplicate_order_created_events_never_charge_twice(serve, client, provider):
    await serve(payments.service)
    before = await handled_by(client, "payments", "on_order_created")
    event = OrderCreated("ord-dup", "c-1", 700)
    await client.publish(ORDER_CREATED, event, event_id="ord-dup-created")
    again = await client.publish(ORDER_CREATED, event, event_id="ord-dup-created")
    assert again.duplicate  # the stream stored it once
    async with anyio.create_task_group() as tg:  # the same order under new event ids, at once
        for n in range(5):
            tg.start_soon(lambda n=n: client.publish(ORDER_CREATED, event, event_id=f"copy-{n}"))

    async def all_handled() -> bool:
        return await handled_by(client, "payments", "on_order_created") == before + 6

    await eventually(all_handled)
    payment = await client.call("payments.get", GetPayment("ord-dup"), returns=Payment)
    assert payment.status == "captured"
    assert provider.charged == {payment.id: 700}
    captured = await client.js.stream_info("EVENTS_PAYMENT")
    assert captured.state.messages == 1  # one payment.captured.v1, whoever published it


async def handled_by(client: Any, service: str, handler: str) -> int:
    """Counted since the service object was first served (the modules' objects are reused)."""
    [stats] = await client.stats(service)
    return next(e.num_requests for e in stats.endpoints if e.name == handler)


class UnavailableOnce(payments.SimulatedProvider):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def charge(self, key: str, amount_cents: int, order_id: str = "") -> str | None:
        self.calls += 1
        if self.calls == 1:
            raise payments.ProviderUnavailable("card network timeout")
        return await super().charge(key, amount_cents, order_id)


async def test_transient_provider_failure_is_retried_with_the_same_payment(
    shop, client, monkeypatch
):
    flaky = UnavailableOnce()
    monkeypatch.setattr(payments, "provider", flaky)
    order = await client.call("orders.create", order_of(900), returns=Order)
    confirmed = await order_reaches(client, order.id, "confirmed")
    assert flaky.calls == 2
    assert flaky.charged == {confirmed.payment_id: 900}


async def test_same_idempotency_key_creates_one_order(shop, client, provider):
    request = order_of(1200, idempotency_key="cart-42")
    first = await client.call("orders.create", request, returns=Order)
    second = await client.call("orders.create", request, returns=Order)
    assert first.id == second.id
    await order_reaches(client, first.id, "confirmed")
    assert len(provider.charged) == 1
    other = msgspec.structs.replace(request, items=[OrderItem("mug-owl", 1, 99)])
    with pytest.raises(BadRequest, match="already used for a different order"):
        await client.call("orders.create", other, returns=Order)


async def test_flaky_notifier_is_retried_until_it_succeeds(shop, client, outbox, monkeypatch):
    flaky = notifications.FlakySender(outbox, failures=2)
    monkeypatch.setattr(notifications, "sender", flaky)
    order = await client.call("orders.create", order_of(300), returns=Order)
    await eventually(lambda: len(outbox.sent) == 1)
    assert flaky.attempts[f"{order.id}-confirmed"] == 3
    await anyio.sleep(0.5)
    assert len(outbox.sent) == 1


async def test_notification_past_max_deliver_is_dead_lettered_then_replayed(
    shop, client, outbox, monkeypatch
):
    flaky = notifications.FlakySender(outbox, failures=5)  # max_deliver is 5
    monkeypatch.setattr(notifications, "sender", flaky)
    order = await client.call("orders.create", order_of(300), returns=Order)

    async def dead_lettered() -> bool:
        return bool(await list_dead_letters(client, service="notifications"))

    await eventually(dead_lettered, timeout=15)
    [letter] = await list_dead_letters(client, service="notifications")
    assert (letter.reason, letter.attempts, letter.handler) == (
        "max_deliver",
        5,
        "on_order_confirmed",
    )
    assert "mail server unavailable" in letter.error
    assert outbox.sent == []

    await replay_dead_letter(client, letter.id)
    await eventually(lambda: len(outbox.sent) == 1)
    assert outbox.sent[0].id == f"{order.id}-confirmed"
    assert await list_dead_letters(client, service="notifications") == []


async def test_refund_flow(shop, client, provider):
    order = await client.call("orders.create", order_of(4000), returns=Order)
    confirmed = await order_reaches(client, order.id, "confirmed")

    refund = Refund(order.id, reason="damaged in transit")
    payment = await client.call("payments.refund", refund, returns=Payment)
    assert (payment.id, payment.status) == (confirmed.payment_id, "refunded")
    refunded = await order_reaches(client, order.id, "refunded")
    assert refunded.reason == "damaged in transit"

    again = await client.call("payments.refund", refund, returns=Payment)  # idempotent
    assert again == payment
    assert provider.refunded == {payment.id}
    with pytest.raises(NotFound):
        await client.call("payments.refund", Refund("ord-missing"), returns=Payment)


async def test_declined_payment_cannot_be_refunded(shop, client):
    order = await client.call("orders.create", order_of(200_000), returns=Order)
    await order_reaches(client, order.id, "cancelled")
    with pytest.raises(ServiceError) as raised:
        await client.call("payments.refund", Refund(order.id), returns=Payment)
    assert raised.value.code == 409


async def test_impossible_transition_is_rejected_to_dead_letters(shop, client):
    order = await client.call("orders.create", order_of(800), returns=Order)
    confirmed = await order_reaches(client, order.id, "confirmed")
    await client.publish(PAYMENT_FAILED, PaymentFailed(order.id, "pay-x", "card stolen"))

    async def rejected() -> bool:
        return bool(await list_dead_letters(client, service="orders"))

    await eventually(rejected)
    [letter] = await list_dead_letters(client, service="orders")
    assert letter.reason == "rejected"
    assert "is confirmed and cannot become cancelled" in letter.error
    assert await client.call("orders.get", GetOrder(order.id), returns=Order) == confirmed


async def test_list_filters_by_customer_and_status(shop, client):
    ok = await client.call("orders.create", order_of(100, "alice"), returns=Order)
    big = await client.call("orders.create", order_of(500_000, "alice"), returns=Order)
    await client.call("orders.create", order_of(100, "bob"), returns=Order)
    await order_reaches(client, ok.id, "confirmed")
    await order_reaches(client, big.id, "cancelled")

    async def listed(query: ListOrders) -> set[str]:
        found = await client.call("orders.list", query, returns=list[Order])
        return {o.id for o in found}

    async def caught_up() -> bool:  # the list is a read model: it follows the events
        return await listed(ListOrders(status="cancelled")) == {big.id}

    await eventually(caught_up)
    assert await listed(ListOrders(customer_id="alice")) == {ok.id, big.id}
    cancelled = await client.call(
        "orders.list", ListOrders(status="cancelled"), returns=list[Order]
    )
    assert [o.id for o in cancelled] == [big.id]
    assert len(await client.call("orders.list", ListOrders(limit=1), returns=list[Order])) == 1


def test_services_load_by_spec():
    for name in ("orders", "payments", "notifications", "inventory"):
        assert load_service(f"services.{name}:service").name == name
