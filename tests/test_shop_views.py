"""The orders read model: projected from the order events, in any order, and rebuilt
from the whole stream under a new generation with `mesh replay`."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import anyio
from support.cli import mesh_cli
from support.shop import place, revenue_of

from framework import Service
from framework.cli.replay import replay
from framework.testing import eventually
from services import views
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_CREATED,
    ORDER_REFUNDED,
    CustomerOrders,
    CustomerQuery,
    ListOrders,
    Order,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderItem,
    OrderRefunded,
)


async def customer_of(client: Any, customer: str, view: str | None = None) -> CustomerOrders:
    found: CustomerOrders = await client.call(
        "orders.customer", CustomerQuery(customer, view), returns=CustomerOrders
    )
    return found


async def test_orders_per_customer_and_revenue_per_day(client, shop):
    a1 = await place(client, "alice", 1_000)
    a2 = await place(client, "alice", 2_500)
    declined = await place(client, "alice", 500_000)  # above the payment limit
    sold_out = await place(client, "bob", 700, sku="kite-red")
    b1 = await place(client, "bob", 300)

    async def projected() -> bool:
        alice = await customer_of(client, "alice")
        return len(alice.orders) == 3 and "pending" not in alice.orders.values()

    await eventually(projected)
    alice = await customer_of(client, "alice")
    assert alice.orders == {a1.id: "confirmed", a2.id: "confirmed", declined.id: "cancelled"}
    assert alice.spent_cents == 3_500
    await eventually(lambda: bob_has(client, {sold_out.id: "cancelled", b1.id: "confirmed"}))
    [today] = await revenue_of(client)
    assert (today.orders, today.revenue_cents) == (3, 3_800)
    assert (
        len(await client.call("orders.list", ListOrders(status="confirmed"), returns=list[Order]))
        == 3
    )
    assert await customer_of(client, "nobody") == CustomerOrders("nobody")


async def bob_has(client: Any, orders_of_bob: dict[str, str]) -> bool:
    return (await customer_of(client, "bob")).orders == orders_of_bob


async def test_events_in_any_order_and_again_project_the_same(serve, client):
    """A view of its own, fed by hand: refunded before confirmed before created, twice."""
    service = Service("view-test")
    views.add_to(service, "t1")
    await serve(service)
    item = [OrderItem("mug-owl", 2, 450)]
    events = [
        (ORDER_REFUNDED, OrderRefunded("o-1", "p-1", 900, "broken", "carol", "refunded")),
        (ORDER_CONFIRMED, OrderConfirmed("o-1", "carol", "p-1", 900)),
        (ORDER_CREATED, OrderCreated("o-1", "carol", 900, item)),
        (ORDER_CREATED, OrderCreated("o-2", "carol", 1_200, item)),
        (ORDER_CONFIRMED, OrderConfirmed("o-2", "carol", "p-2", 1_200)),
        (ORDER_CREATED, OrderCreated("o-3", "carol", 50, item)),
        (ORDER_CANCELLED, OrderCancelled("o-3", "carol", "out of stock", 50)),
    ]
    for copy in range(2):
        for n, (event_type, event) in enumerate(events):
            await client.publish(event_type, event, key=event.order_id, event_id=f"e{n}-{copy}")
            await anyio.sleep(0.05)  # each handled before the next: the order is the test's
    expected = {"o-1": "refunded", "o-2": "confirmed", "o-3": "cancelled"}

    async def projected() -> bool:
        return (await views.customer(client, "carol", "t1")).orders == expected

    await eventually(projected)
    await anyio.sleep(0.5)
    carol = await views.customer(client, "carol", "t1")
    assert (carol.orders, carol.spent_cents) == (expected, 1_200)
    [day] = await views.revenue(client, 30, "t1")
    assert (day.orders, day.revenue_cents) == (2, 1_200)  # o-1 counted, its revenue refunded
    listed = await views.list_orders(client, ListOrders(customer_id="carol"), "t1")
    assert [(o.id, o.items, o.status) for o in listed] == [
        ("o-1", item, "refunded"),
        ("o-2", item, "confirmed"),
        ("o-3", item, "cancelled"),
    ]


async def test_a_new_generation_is_rebuilt_from_the_whole_stream(client, shop):
    for n in range(4):
        await place(client, f"dave-{n % 2}", 1_000 + n)
    await eventually(lambda: has_orders(client, "dave-1", 2))
    v1 = [await customer_of(client, f"dave-{n}") for n in range(2)]

    service = Service("orders")  # what `ORDERS_VIEW=v2` declares
    views.add_to(service, "v2")
    lines: list[str] = []
    handled = await replay(client, service, ["view_v2_*"], timeout=30, out=lines.append)
    assert handled["view_v2_created"] == 4 and handled["view_v2_confirmed"] == 4
    assert lines[-1].startswith("replayed in")
    assert [await customer_of(client, f"dave-{n}", "v2") for n in range(2)] == v1
    assert await revenue_of(client, "v2") == await revenue_of(client)


async def has_orders(client: Any, customer: str, count: int) -> bool:
    entry = await customer_of(client, customer)
    return len(entry.orders) == count and "pending" not in entry.orders.values()


async def test_mesh_replay_command(client, shop, nats_url):
    """`ORDERS_VIEW=v3 mesh replay services.orders:service --handler 'view_v3_*'`."""
    order = await place(client, "erin", 4_200)
    env = {**os.environ, "ORDERS_VIEW": "v3", "NATS_URL": nats_url}

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return mesh_cli("replay", "services.orders:service", *args, env=env)

    done = await anyio.to_thread.run_sync(mesh, "--handler", "view_v3_*")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "view_v3_created: 1 deliveries, caught up" in done.stdout
    assert (await customer_of(client, "erin", "v3")).orders == {order.id: "confirmed"}
    wrong = await anyio.to_thread.run_sync(mesh, "--handler", "nothing_*")
    assert wrong.returncode == 2 and "no subscriber of orders matches nothing_*" in wrong.stderr
