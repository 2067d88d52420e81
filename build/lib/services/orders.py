"""Orders: take an order, then follow its payment to confirmed or cancelled.

    pending --payment.captured--> confirmed --payment.refunded--> refunded
       \\------payment.failed----> cancelled

Orders live in the "orders" key-value bucket. Every change is a compare-and-set on the
entry's revision, so two replicas handling events of one order never lose an update.
Events published here carry ids derived from the order, so a retried request or a
redelivered event stores nothing twice: it finds the work done and re-publishes an
event id the stream has already seen.

Run it alone with `python -m services.orders`, or with the others:
`mesh run services.orders:service services.payments:service services.notifications:service`.
"""

from __future__ import annotations

import hashlib
import uuid

import msgspec
from nats.js.errors import KeyWrongLastSequenceError, NoKeysError

from framework import BadRequest, Context, Reject, Service
from services.buckets import Bucket, read, read_existing
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_CREATED,
    PAYMENT_CAPTURED,
    PAYMENT_FAILED,
    PAYMENT_REFUNDED,
    CreateOrder,
    GetOrder,
    ListOrders,
    Order,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderStatus,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
)

MAX_ORDER_TOTAL_CENTS = 10_000_000

service = Service(
    "orders",
    version="1.0.0",
    description="Takes orders and follows them to confirmed or cancelled",
    publishes=[ORDER_CREATED, ORDER_CONFIRMED, ORDER_CANCELLED],
)
orders = Bucket("orders", "orders by id")

# Where each status may go next; anything else is impossible and is rejected.
NEXT: dict[OrderStatus, set[OrderStatus]] = {
    "pending": {"confirmed", "cancelled"},
    "confirmed": {"refunded"},
    "cancelled": set(),
    "refunded": set(),
}


def later(status: OrderStatus) -> set[OrderStatus]:
    """Every status an order can reach from `status`."""
    reached = set(NEXT[status])
    for step in NEXT[status]:
        reached |= later(step)
    return reached


class NotYet(Exception):
    """An event overtook the one it follows (refunded before confirmed): retried later."""


# --- requests ---------------------------------------------------------------------------


@service.rpc("create")
async def create(req: CreateOrder, ctx: Context) -> Order:
    """Store a pending order and announce it; the same idempotency key answers the same order."""
    order = Order(
        id=new_order_id(req),
        customer_id=req.customer_id,
        items=req.items,
        total_cents=total_of(req),
        status="pending",
    )
    kv = await orders.open(ctx.client)
    try:
        await kv.create(order.id, msgspec.json.encode(order))
    except KeyWrongLastSequenceError:  # a retry of a request that created it already
        found = await read(kv, order.id, Order)
        if found is None or found[0].items != req.items:
            raise BadRequest("idempotency_key was already used for a different order") from None
        order = found[0]
    if order.status == "pending":  # (again, if the first try stopped before publishing)
        await ctx.publish(
            ORDER_CREATED,
            OrderCreated(order.id, order.customer_id, order.total_cents),
            event_id=f"{order.id}-created",
        )
    ctx.log.info("order created", order_id=order.id, total_cents=order.total_cents)
    return order


def new_order_id(req: CreateOrder) -> str:
    if req.idempotency_key is None:
        return f"ord-{uuid.uuid4().hex[:20]}"
    key = f"{req.customer_id}:{req.idempotency_key}".encode()
    return f"ord-{hashlib.sha256(key).hexdigest()[:20]}"


def total_of(req: CreateOrder) -> int:
    """Rules the contract's field constraints cannot express (those are checked on decode)."""
    skus = [item.sku for item in req.items]
    for sku in skus:
        if skus.count(sku) > 1:
            raise BadRequest(f"sku {sku!r} is listed twice: put its whole quantity on one line")
    total = sum(item.quantity * item.unit_price_cents for item in req.items)
    if total == 0:
        raise BadRequest("order total is 0: at least one item needs a price")
    if total > MAX_ORDER_TOTAL_CENTS:
        raise BadRequest(
            f"order total {total} cents is above the limit of {MAX_ORDER_TOTAL_CENTS} cents"
        )
    return total


@service.rpc("get")
async def get(req: GetOrder, ctx: Context) -> Order:
    kv = await orders.open(ctx.client)
    order, _ = await read_existing(kv, req.order_id, Order, f"no order {req.order_id}")
    return order


@service.rpc("list")
async def list_orders(req: ListOrders, ctx: Context) -> list[Order]:
    """A scan of the bucket: fine for a sample; a real store keeps an index per customer."""
    kv = await orders.open(ctx.client)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    result: list[Order] = []
    for key in sorted(keys):
        found = await read(kv, key, Order)
        if found is None:
            continue
        order = found[0]
        if req.customer_id not in (None, order.customer_id):
            continue
        if req.status not in (None, order.status):
            continue
        result.append(order)
        if len(result) == req.limit:
            break
    return result


# --- events -----------------------------------------------------------------------------


@service.subscribe(PAYMENT_CAPTURED, backoff=[0.5, 2, 5, 15])
async def on_payment_captured(event: PaymentCaptured, ctx: Context) -> None:
    order = await transition(ctx, event.order_id, "confirmed", payment_id=event.payment_id)
    if order.status == "confirmed":
        confirmed = OrderConfirmed(order.id, order.customer_id, event.payment_id, order.total_cents)
        await ctx.publish(ORDER_CONFIRMED, confirmed, event_id=f"{order.id}-confirmed")


@service.subscribe(PAYMENT_FAILED, backoff=[0.5, 2, 5, 15])
async def on_payment_failed(event: PaymentFailed, ctx: Context) -> None:
    order = await transition(ctx, event.order_id, "cancelled", reason=event.reason)
    if order.status == "cancelled":
        cancelled = OrderCancelled(order.id, order.customer_id, event.reason)
        await ctx.publish(ORDER_CANCELLED, cancelled, event_id=f"{order.id}-cancelled")


@service.subscribe(PAYMENT_REFUNDED, backoff=[0.5, 2, 5, 15])
async def on_payment_refunded(event: PaymentRefunded, ctx: Context) -> None:
    await transition(ctx, event.order_id, "refunded", reason=event.reason)


async def transition(
    ctx: Context, order_id: str, target: OrderStatus, **changes: str | None
) -> Order:
    """Move the order to `target` and return it.

    An order already there (or past it) is returned unchanged: the event is a redelivery.
    A move the state machine does not allow raises `Reject` (dead-lettered, no retry).
    """
    kv = await orders.open(ctx.client)
    while True:
        found = await read(kv, order_id, Order)
        if found is None:
            raise Reject(f"no order {order_id}")
        order, revision = found
        if order.status == target or order.status in later(target):
            return order
        if target not in NEXT[order.status]:
            if target in later(order.status):
                raise NotYet(f"order {order_id} is {order.status}, not yet ready for {target}")
            raise Reject(f"order {order_id} is {order.status} and cannot become {target}")
        updated = msgspec.structs.replace(order, status=target, **changes)
        try:
            await kv.update(order_id, msgspec.json.encode(updated), last=revision)
        except KeyWrongLastSequenceError:
            continue  # another replica changed it meanwhile: decide again on the new state
        ctx.log.info("order status changed", order_id=order_id, old=order.status, new=target)
        return updated


if __name__ == "__main__":
    service.run()
