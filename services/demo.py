"""`mesh demo`: place a few orders on a running mesh and show where each one ended.

Some orders are above the payment provider's limit and get declined, so the demo shows
both paths: pending -> confirmed (payment captured, customer notified) and
pending -> cancelled (payment declined, customer notified).
"""

from __future__ import annotations

import sys

import anyio

from framework import ServiceError, connect
from services.contracts import CreateOrder, GetOrder, Order, OrderItem

__all__ = ["run_demo"]

FINAL = ("confirmed", "cancelled", "refunded")
# (customer, sku, quantity, unit price in cents): every third one is above the limit
BASKETS = [
    ("alice", "book-dune", 2, 1_999),
    ("bob", "lamp-arc", 1, 4_500),
    ("carol", "piano-grand", 1, 2_500_000),
    ("dave", "mug-owl", 4, 850),
    ("erin", "bike-road", 1, 189_900),
    ("frank", "pen-ink", 10, 299),
]


def _order_request(n: int) -> CreateOrder:
    customer, sku, quantity, price = BASKETS[n % len(BASKETS)]
    return CreateOrder(
        customer_id=f"{customer}-{n}",
        items=[OrderItem(sku=sku, quantity=quantity, unit_price_cents=price)],
    )


async def _place(url: str | None, count: int) -> list[Order]:
    async with connect(url, name="demo") as client:
        placed = [
            await client.call("orders.create", _order_request(n), returns=Order, timeout=5)
            for n in range(count)
        ]
        for order in placed:
            print(
                f"placed    {order.id}  {order.customer_id:<10} {order.total_cents / 100:>10.2f}  {order.status}"
            )
        final: dict[str, Order] = {}
        with anyio.move_on_after(30):
            while len(final) < len(placed):
                for order in placed:
                    if order.id not in final:
                        now = await client.call("orders.get", GetOrder(order.id), returns=Order)
                        if now.status in FINAL:
                            final[order.id] = now
                await anyio.sleep(0.2)
        return [final.get(order.id, order) for order in placed]


def run_demo(url: str | None = None, *, orders: int = 6) -> int:
    try:
        results = anyio.run(_place, url, orders, backend="asyncio")
    except (ServiceError, OSError, TimeoutError) as error:
        print(f"demo: {error} (is the mesh up? `just up` in another terminal)", file=sys.stderr)
        return 1
    except Exception as error:  # nats-py's "no servers available" and friends
        print(f"demo: cannot reach the mesh: {error!r} (`just up` first)", file=sys.stderr)
        return 1
    print()
    print(f"{'order':<26} {'customer':<10} {'total':>10}  final state")
    for order in results:
        why = f" ({order.reason})" if order.reason else ""
        print(
            f"{order.id:<26} {order.customer_id:<10} {order.total_cents / 100:>10.2f}  {order.status}{why}"
        )
    unfinished = [o.id for o in results if o.status not in FINAL]
    if unfinished:
        print(
            f"demo: {len(unfinished)} order(s) did not reach a final state in 30 s", file=sys.stderr
        )
        return 1
    return 0
