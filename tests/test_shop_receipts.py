"""The receipt job: a confirmed order's receipt rendered once, with progress, stored and
sent; a cancelled order gets none."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from support.shop import Outbox, final, serve_shop

from framework import NotFound
from framework.testing import eventually
from services import inventory, notifications, orders, payments, receipts
from services.contracts import CreateOrder, GetReceipt, Order, OrderItem


@pytest.fixture
async def shop(serve: Any, outbox: Outbox, provider: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receipts, "LINE_DELAY", 0.2)  # long enough to watch its progress
    await serve_shop(serve, notifications, payments, inventory, receipts, orders)


async def test_a_confirmed_order_gets_one_receipt_with_progress(client, shop, outbox):
    items = [
        OrderItem("book-dune", 2, 1_999),
        OrderItem("mug-owl", 1, 850),
        OrderItem("pen-ink", 3, 299),
    ]
    order = await client.call("orders.create", CreateOrder("c-9", items), returns=Order)
    handle = client.job(orders.RENDER_RECEIPT, order.id)

    async def enqueued() -> bool:
        try:
            await handle.status()
        except NotFound:
            return False
        return True

    await eventually(enqueued, 15)
    seen = [status async for status in handle.watch()]
    progress = [s.progress for s in seen if s.state == "running"]
    assert progress == sorted(progress) and len(set(progress)) >= 2, seen
    assert seen[-1].state == "succeeded" and seen[-1].attempt == 1
    assert seen[-1].result == {
        "order_id": order.id,
        "receipt_id": f"rcpt-{order.id}",
        "lines": 3,
        "total_cents": 5_745,
    }
    stored = await client.call("receipts.get", GetReceipt(order.id))
    assert "Total" in stored["text"] and "57.45" in stored["text"]
    await eventually(lambda: sorted(n.kind for n in outbox.sent) == ["order_confirmed", "receipt"])
    [note] = [n for n in outbox.sent if n.kind == "receipt"]
    assert note.message == stored["text"]

    # the confirmation's triggers delivered again: the finished job is not run again
    for record in await client.history("stock", order.id) + await client.history(
        "payment", order.id
    ):
        headers = {"Nats-Msg-Id": f"{record.event_id}-again", "Event-Type": record.type}
        await client.nc.publish(record.subject, record.data, headers=headers)
    await anyio.sleep(1.5)
    status = await handle.status()
    assert (status.state, status.attempt) == ("succeeded", 1)
    assert [r.type for r in await client.history("receipt", order.id)] == ["receipt.rendered.v1"]
    assert sorted(n.kind for n in outbox.sent) == ["order_confirmed", "receipt"]


async def test_a_cancelled_order_gets_no_receipt(client, shop, outbox):
    request = CreateOrder("c-8", [OrderItem("kite-red", 1, 1_000)])  # sold out
    order = await client.call("orders.create", request, returns=Order)
    assert (await final(client, order.id)).status == "cancelled"
    await eventually(lambda: [n.kind for n in outbox.sent] == ["order_cancelled"])
    await anyio.sleep(0.5)
    with pytest.raises(NotFound):
        await client.job(orders.RENDER_RECEIPT, order.id).status()
    with pytest.raises(NotFound, match="no receipt"):
        await client.call("receipts.get", GetReceipt(order.id))
