"""The orders read model: orders per customer and revenue per day, projected from events.

The order events are the truth; this is derived data, kept where queries want it. Four
subscribers of the orders service (`view_<generation>_created`, `..._confirmed`,
`..._cancelled`, `..._refunded`) fold every order event into the "orders-view" bucket,
under keys of their generation (`ORDERS_VIEW`, default `v1`):

    <generation>.order.<order_id>     the order as the view knows it
    <generation>.customer.<id>        CustomerOrders: the customer's orders and spend
    <generation>.day.<YYYY-MM-DD>     DailyRevenue: confirmed orders and revenue that day

The subscribers use `deliver="all"`: a new generation starts from the first event in
the stream, so rebuilding the read model (a bug fixed, a new query) is running it
under a new name: `ORDERS_VIEW=v2 mesh replay services.orders:service --handler
'view_v2_*'` fills generation v2 from the whole stream and exits once it has caught up;
the service started with `ORDERS_VIEW=v2` continues from there. Queries take the
generation to read (`view`), the service's own by default.

Events of one order come through four consumers, so in any order: the order's entry
keeps the furthest status (pending < confirmed, cancelled < refunded) and each event
changes the customer's and the day's totals by the difference it makes to the order's
entry. Those keys change together, in one atomic batch guarded by their revisions, so
a redelivered event (same difference: none) counts once.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import msgspec

from framework import Client, Context, Service
from services.buckets import Bucket, Conflict, Write, keys_matching, read, write_all
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_CREATED,
    ORDER_REFUNDED,
    CustomerOrders,
    DailyRevenue,
    ListOrders,
    Order,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderItem,
    OrderRefunded,
    OrderStatus,
)

VIEW = os.environ.get("ORDERS_VIEW", "v1") or "v1"
RANK: dict[OrderStatus, int] = {"pending": 0, "confirmed": 1, "cancelled": 1, "refunded": 2}
RETRIES = 50

bucket = Bucket("orders-view", "the orders read model, by generation", atomic=True)


class Fact(msgspec.Struct, frozen=True):
    """What one order event says about its order."""

    order_id: str
    customer_id: str
    status: OrderStatus
    total_cents: int
    items: list[OrderItem] | None = None
    reason: str | None = None
    day: str | None = None  # of a confirmation


class Summary(msgspec.Struct, frozen=True, omit_defaults=True):
    """The view's entry of one order."""

    order: Order
    confirmed_day: str | None = None


def fact_of(event: Any, day: str) -> Fact:
    """The fact an order event states; `day` is when it was published (UTC)."""
    if isinstance(event, OrderCreated):
        return Fact(event.order_id, event.customer_id, "pending", event.total_cents, event.items)
    if isinstance(event, OrderConfirmed):
        return Fact(event.order_id, event.customer_id, "confirmed", event.total_cents, day=day)
    if isinstance(event, OrderCancelled):
        return Fact(
            event.order_id, event.customer_id, "cancelled", event.total_cents, reason=event.reason
        )
    assert isinstance(event, OrderRefunded)
    return Fact(
        event.order_id, event.customer_id, event.status, event.amount_cents, reason=event.reason
    )


def merge(old: Summary | None, fact: Fact) -> Summary:
    """The entry with the fact in it: the furthest status, every field known so far."""
    if old is None:
        order = Order(
            fact.order_id, fact.customer_id, fact.items or [], fact.total_cents, "pending"
        )
        old = Summary(order)
    order = old.order
    status = fact.status if RANK[fact.status] > RANK[order.status] else order.status
    order = msgspec.structs.replace(
        order,
        status=status,
        customer_id=order.customer_id or fact.customer_id,
        items=order.items or fact.items or [],
        total_cents=order.total_cents or fact.total_cents,
        reason=fact.reason or order.reason,
    )
    return Summary(order, old.confirmed_day or fact.day)


def revenue_of(entry: Summary | None) -> tuple[str, int, int] | None:
    """(day, orders, cents) the entry adds to a day: a confirmed order its total, a
    refunded one nothing but its count; None before its confirmation is known."""
    if entry is None or entry.confirmed_day is None:
        return None
    if entry.order.status not in ("confirmed", "refunded"):
        return None
    cents = entry.order.total_cents if entry.order.status == "confirmed" else 0
    return entry.confirmed_day, 1, cents


def spent_of(entry: Summary | None) -> int:
    return entry.order.total_cents if entry and entry.order.status == "confirmed" else 0


async def project(client: Client, view: str, fact: Fact) -> bool:
    """The fact folded into the view; False when it changed nothing (a redelivery)."""
    kv = await bucket.open(client)
    for _ in range(RETRIES):
        key = f"{view}.order.{fact.order_id}"
        found = await read(kv, key, Summary)
        old = found[0] if found else None
        new = merge(old, fact)
        if new == old:
            return False
        writes = [Write(key, new, found[1] if found else 0)]
        writes.append(await customer_write(kv, view, old, new))
        writes += await day_writes(kv, view, old, new)
        try:
            await write_all(client, bucket, writes)
            return True
        except Conflict:
            continue
    raise RuntimeError(f"read model: {RETRIES} conflicting writes for {fact.order_id}")


async def customer_write(kv: Any, view: str, old: Summary | None, new: Summary) -> Write:
    key = f"{view}.customer.{new.order.customer_id}"
    found = await read(kv, key, CustomerOrders)
    entry = found[0] if found else CustomerOrders(new.order.customer_id)
    entry = CustomerOrders(
        entry.customer_id,
        {**entry.orders, new.order.id: new.order.status},
        entry.spent_cents + spent_of(new) - spent_of(old),
    )
    return Write(key, entry, found[1] if found else 0)


async def day_writes(kv: Any, view: str, old: Summary | None, new: Summary) -> list[Write]:
    """The days whose totals the change moves (none, one, or the old and the new day)."""
    deltas: dict[str, tuple[int, int]] = {}
    for contribution, sign in ((revenue_of(old), -1), (revenue_of(new), 1)):
        if contribution is not None:
            day, orders, cents = contribution
            before = deltas.get(day, (0, 0))
            deltas[day] = (before[0] + sign * orders, before[1] + sign * cents)
    writes = []
    for day, (orders, cents) in deltas.items():
        if (orders, cents) == (0, 0):
            continue
        key = f"{view}.day.{day}"
        found = await read(kv, key, DailyRevenue)
        entry = found[0] if found else DailyRevenue(day, 0, 0)
        entry = DailyRevenue(day, entry.orders + orders, entry.revenue_cents + cents)
        writes.append(Write(key, entry, found[1] if found else 0))
    return writes


# --- the subscribers --------------------------------------------------------------------

PROJECTED: dict[str, tuple[Literal["created", "confirmed", "cancelled", "refunded"], type]] = {
    ORDER_CREATED: ("created", OrderCreated),
    ORDER_CONFIRMED: ("confirmed", OrderConfirmed),
    ORDER_CANCELLED: ("cancelled", OrderCancelled),
    ORDER_REFUNDED: ("refunded", OrderRefunded),
}


def add_to(service: Service, view: str = VIEW) -> None:
    """The read model's subscribers of generation `view`, on `service`."""
    for event_type, (action, payload_type) in PROJECTED.items():
        handler = projector(view, payload_type)
        handler.__name__ = f"view_{view}_{action}"
        service.subscribe(
            event_type,
            name=f"view_{view}_{action}",
            deliver="all",
            backoff=[0.2, 0.5, 1, 2, 5],
            max_deliver=10,
        )(handler)


def projector(view: str, payload_type: type) -> Any:
    async def handle(event: Any, ctx: Context) -> None:
        day = (ctx.headers.get("Event-Time") or "")[:10] or "unknown"
        await project(ctx.client, view, fact_of(event, day))

    # the payload type is decided here, at run time: what the framework decodes into
    handle.__annotations__ = {"event": payload_type, "ctx": Context, "return": None}
    return handle


# --- queries ----------------------------------------------------------------------------


async def customer(client: Client, customer_id: str, view: str | None) -> CustomerOrders:
    kv = await bucket.open(client)
    found = await read(kv, f"{view or VIEW}.customer.{customer_id}", CustomerOrders)
    return found[0] if found else CustomerOrders(customer_id)


async def revenue(client: Client, days: int, view: str | None) -> list[DailyRevenue]:
    """The latest `days` days with confirmed orders, newest first."""
    kv = await bucket.open(client)
    keys = await keys_matching(client, bucket, f"{view or VIEW}.day.*")
    result = []
    for key in sorted(keys, reverse=True)[:days]:
        found = await read(kv, key, DailyRevenue)
        if found is not None:
            result.append(found[0])
    return result


async def list_orders(client: Client, req: ListOrders, view: str | None = None) -> list[Order]:
    """A customer's orders from their entry; all orders by a scan of the view (fine for a
    sample: a real read model would sit in a database with an index per query)."""
    kv = await bucket.open(client)
    generation = view or VIEW
    if req.customer_id is not None:
        entry = await customer(client, req.customer_id, generation)
        keys = [f"{generation}.order.{order_id}" for order_id in sorted(entry.orders)]
    else:
        keys = sorted(await keys_matching(client, bucket, f"{generation}.order.*"))
    result: list[Order] = []
    for key in keys:
        found = await read(kv, key, Summary)
        if found is None or req.status not in (None, found[0].order.status):
            continue
        result.append(found[0].order)
        if len(result) == req.limit:
            break
    return result
