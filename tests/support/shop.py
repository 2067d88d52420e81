"""The sample shop (services/) in tests: a recording outbox, a slow card network, the
services started as the saga needs them, and waits for an order's state.

The `outbox` and `provider` fixtures (tests/conftest.py) install the doubles.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import anyio

from framework.testing import Serve, eventually
from services import inventory, notifications, orders, payments
from services.contracts import (
    CreateOrder,
    DailyRevenue,
    GetOrder,
    Notification,
    Order,
    OrderItem,
    RevenueQuery,
)

SHOP: tuple[ModuleType, ...] = (notifications, payments, inventory, orders)
"""The saga's services, in the order `serve_shop` starts them (orders last)."""


class Outbox:
    """A notifications sender that keeps what it is given, in `sent`."""

    def __init__(self) -> None:
        self.sent: list[Notification] = []

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)


class SlowProvider(payments.SimulatedProvider):
    """A card network that takes `delay` seconds per charge: whatever watches an order
    (a page, an event stream) is open before the order is final."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def charge(self, key: str, amount_cents: int, order_id: str = "") -> str | None:
        await anyio.sleep(self.delay)
        return await super().charge(key, amount_cents, order_id)


async def serve_shop(serve: Serve, *modules: ModuleType) -> None:
    """Serve `modules` (default: `SHOP`) in the test's loop, in the order given."""
    for module in modules or SHOP:
        await serve(module.service)


async def order_when(
    client: Any, order_id: str, ready: Callable[[Order], bool], timeout: float = 15.0
) -> Order:
    """The order as `orders.get` answers it, once `ready(order)` is true."""
    seen: list[Order] = []

    async def check() -> Order | None:
        seen[:] = [await client.call("orders.get", GetOrder(order_id), returns=Order)]
        return seen[0] if ready(seen[0]) else None

    found: Order = await eventually(check, timeout, lambda: f"order {order_id}: {seen}")
    return found


async def final(client: Any, order_id: str, timeout: float = 15.0) -> Order:
    """The order once it is no longer pending (confirmed or cancelled)."""
    return await order_when(client, order_id, lambda order: order.status != "pending", timeout)


async def place(client: Any, customer: str, cents: int, sku: str = "book-dune") -> Order:
    """One order of one `sku` at `cents`, through `orders.create`, once it is final."""
    request = CreateOrder(customer, [OrderItem(sku, 1, cents)])
    order: Order = await client.call("orders.create", request, returns=Order)
    await final(client, order.id)
    return order


async def revenue_of(client: Any, view: str | None = None) -> list[DailyRevenue]:
    """`orders.revenue` of the read model's generation `view` (default: the service's)."""
    found: list[DailyRevenue] = await client.call(
        "orders.revenue", RevenueQuery(view=view), returns=list[DailyRevenue]
    )
    return found
