"""Orders: take an order and run its saga to confirmed or cancelled.

An order is event-sourced: its state is the fold of its events, read back from
JetStream by order id (`ctx.history("order", order_id)`: every `events.order.*.*.<id>`).
Nothing else stores it. Each change appends events with
`expected_last_subject_sequence` = the sequence of the last event read, so two
deliveries deciding on the same order at once cannot both write: the loser gets
`ConcurrencyConflict`, reads again and decides again.

The saga is choreographed. Inventory and payments both react to order.created.v1;
orders notes what they did and decides:

    stock.reserved.v1  --> order.reserved.v1 --\\
    payment.captured.v1 --> order.paid.v1 ------+--> both: order.confirmed.v1
    stock.rejected.v1 | payment.failed.v1 | order.expired.v1 --> order.cancelled.v1

order.cancelled.v1 makes inventory release what it holds and payments refund what it
charged (their compensations). The saga deadline is a message the server itself
publishes `ORDER_TIMEOUT` seconds after the order was taken (an ADR-51 `@at` schedule
on `events.order.deadline.<id>` that produces order.expired.v1): no timer and no
polling loop of ours; a final order's pending schedule is purged.

Decisions are level-triggered: a handler folds the events, appends what the state
calls for and folds again until nothing is missing, so a redelivery after a crash
between two appends completes the work, and the events may come in any order
(stock.reserved.v1 before or after payment.captured.v1).

Run it alone with `python -m services.orders`, or the whole shop with `just up`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from framework import (
    BadRequest,
    Client,
    ConcurrencyConflict,
    Context,
    EventRecord,
    NotFound,
    Reject,
    Service,
    Stream,
)
from services import views
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_CREATED,
    ORDER_EXPIRED,
    ORDER_PAID,
    ORDER_REFUNDED,
    ORDER_RESERVED,
    PAYMENT_CAPTURED,
    PAYMENT_FAILED,
    PAYMENT_REFUNDED,
    STOCK_REJECTED,
    STOCK_RESERVED,
    CreateOrder,
    CustomerOrders,
    CustomerQuery,
    DailyRevenue,
    GetOrder,
    ListOrders,
    Order,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    OrderExpired,
    OrderHistory,
    OrderPaid,
    OrderRefunded,
    OrderReserved,
    OrderStatus,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
    RenderReceipt,
    RevenueQuery,
    StockRejected,
    StockReserved,
    TimelineEntry,
)

MAX_ORDER_TOTAL_CENTS = 10_000_000
ORDER_TIMEOUT = float(os.environ.get("ORDER_TIMEOUT", "30") or 30)  # the saga deadline, s
ORDER_STREAM = "EVENTS_ORDER"
RENDER_RECEIPT = "receipts.render"  # the job kind of services.receipts
RETRIES = 20  # concurrent writers one decision will out-wait before it is retried later

service = Service(
    "orders",
    version="2.0.0",
    description="Takes orders and runs their saga to confirmed or cancelled",
    publishes=[
        ORDER_CREATED,
        ORDER_RESERVED,
        ORDER_PAID,
        ORDER_CONFIRMED,
        ORDER_CANCELLED,
        ORDER_REFUNDED,
    ],
    # the order domain's stream, with message schedules allowed (the saga deadline)
    streams=[
        Stream(
            ORDER_STREAM,
            ["events.order.>"],
            description="events of the order domain",
            extra={"allow_msg_schedules": True},
        )
    ],
)
views.add_to(service)


class NotYet(Exception):
    """An event overtook the one it follows (a refund before the capture): retried later."""


# --- the fold ---------------------------------------------------------------------------


def fold(records: list[EventRecord]) -> Order | None:
    """The order its events describe, or None before order.created.v1."""
    order: Order | None = None
    for record in records:
        order = evolve(order, record)
    return order


def evolve(order: Order | None, record: EventRecord) -> Order | None:
    """One event applied to the order: the only place where order state changes.

    The same state machine as the decisions: an event the state does not allow (a
    second order.created.v1, a cancellation after the confirmation: copies published
    again under new ids) changes nothing but the version.
    """
    if order is None:
        return created(record) if record.type == ORDER_CREATED else None
    replace = msgspec.structs.replace
    pending = order.status == "pending"
    if record.type == ORDER_RESERVED:
        order = replace(order, stock_reserved=True)
    elif record.type == ORDER_PAID and not order.paid:
        order = replace(order, paid=True, payment_id=record.decode(OrderPaid).payment_id)
    elif record.type == ORDER_CONFIRMED and pending:
        order = replace(order, status="confirmed")
    elif record.type == ORDER_CANCELLED and pending:
        order = replace(order, status="cancelled", reason=record.decode(OrderCancelled).reason)
    elif record.type == ORDER_REFUNDED and not order.refunded:
        if order.status == "confirmed":  # a refund after the sale: why is the news
            reason = record.decode(OrderRefunded).reason
            order = replace(order, refunded=True, status="refunded", reason=reason)
        else:  # a cancelled order's compensation: why it was cancelled stays
            order = replace(order, refunded=True)
    return replace(order, version=record.sequence)


def created(record: EventRecord) -> Order:
    event = record.decode(OrderCreated)
    return Order(
        id=event.order_id,
        customer_id=event.customer_id,
        items=event.items,
        total_cents=event.total_cents,
        status="pending",
        created_at=record.time.isoformat().replace("+00:00", "Z"),
        version=record.sequence,
    )


# --- decisions: what the state calls for ------------------------------------------------

Event = tuple[str, msgspec.Struct, str]  # type, payload, event id
Decide = Callable[[Order], list[Event]]


def confirm_or_cancel(order: Order) -> list[Event]:
    """The saga's join: confirmed once both steps are done."""
    if order.status == "pending" and order.stock_reserved and order.paid:
        payment_id = order.payment_id or ""
        confirmed = OrderConfirmed(order.id, order.customer_id, payment_id, order.total_cents)
        return [(ORDER_CONFIRMED, confirmed, f"{order.id}-confirmed")]
    return []


def cancel(order: Order, reason: str) -> list[Event]:
    if order.status != "pending":
        return []
    cancelled = OrderCancelled(order.id, order.customer_id, reason, order.total_cents)
    return [(ORDER_CANCELLED, cancelled, f"{order.id}-cancelled")]


def stock_reserved(order: Order) -> list[Event]:
    if order.status != "pending":
        return []  # cancelled meanwhile: inventory releases on order.cancelled.v1
    if not order.stock_reserved:
        return [(ORDER_RESERVED, OrderReserved(order.id), f"{order.id}-reserved")]
    return confirm_or_cancel(order)


def payment_captured(event: PaymentCaptured) -> Decide:
    def decide(order: Order) -> list[Event]:
        if order.status != "pending":
            return []  # cancelled meanwhile: payments refunds on order.cancelled.v1
        if not order.paid:
            paid = OrderPaid(order.id, event.payment_id, event.amount_cents)
            return [(ORDER_PAID, paid, f"{order.id}-paid")]
        return confirm_or_cancel(order)

    return decide


def payment_failed(event: PaymentFailed) -> Decide:
    def decide(order: Order) -> list[Event]:
        if order.status in ("confirmed", "refunded"):
            raise Reject(f"order {order.id} is {order.status} and cannot become cancelled")
        return cancel(order, event.reason)

    return decide


def payment_refunded(event: PaymentRefunded) -> Decide:
    def decide(order: Order) -> list[Event]:
        if order.refunded:
            return []
        if order.status == "pending" and not order.paid:
            raise NotYet(f"order {order.id}: refunded before its capture was noted")
        status: OrderStatus = "refunded" if order.status == "confirmed" else "cancelled"
        refunded = OrderRefunded(
            order.id, event.payment_id, event.amount_cents, event.reason, order.customer_id, status
        )
        events: list[Event] = [(ORDER_REFUNDED, refunded, f"{order.id}-refunded")]
        return events + cancel(order, f"payment refunded: {event.reason}")

    return decide


def expired(order: Order) -> list[Event]:
    return cancel(order, f"not completed within {ORDER_TIMEOUT:g}s (saga deadline)")


async def apply(ctx: Context, order_id: str, decide: Decide) -> Order:
    """Fold, decide, append with the expected sequence; again until nothing is missing."""
    for _ in range(RETRIES):
        order = fold(await ctx.history("order", order_id))
        if order is None:
            raise NotYet(f"no order {order_id} (yet)")
        events = decide(order)
        if not events:
            return order
        try:
            version = order.version
            for event_type, payload, event_id in events:
                ack = await ctx.publish(
                    event_type,
                    payload,
                    key=order_id,
                    event_id=event_id,
                    expected_last_subject_sequence=version,
                )
                version = ack.seq
        except ConcurrencyConflict:
            continue  # another delivery wrote first: decide again on what it wrote
        ctx.log.info("order changed", order_id=order_id, events=[e[0] for e in events])
    raise RuntimeError(f"order {order_id}: {RETRIES} conflicting writers; retried later")


async def settle(ctx: Context, order: Order) -> None:
    """What a final order needs: its deadline schedule gone, a confirmed one's receipt
    job enqueued (checked again on every delivery that sees it final: a crash after
    the confirmation was stored must not lose the receipt)."""
    if order.status == "pending":
        return
    await cancel_deadline(ctx.client, order.id)
    if order.status == "confirmed":
        await request_receipt(ctx, order)


async def request_receipt(ctx: Context, order: Order) -> None:
    """Enqueue `receipts.render` for the order once: the job id is the order id."""
    handle = ctx.client.job(RENDER_RECEIPT, order.id)
    try:
        await handle.status()
        return  # enqueued before (maybe done already): never a second receipt
    except NotFound:
        pass
    job = RenderReceipt(
        order.id, order.customer_id, order.items, order.total_cents, order.payment_id or ""
    )
    await ctx.client.enqueue(RENDER_RECEIPT, job, job_id=order.id, parent=ctx)


# --- the saga ---------------------------------------------------------------------------

BACKOFF = [0.2, 0.5, 1, 2, 5, 10]


@service.subscribe(STOCK_RESERVED, backoff=BACKOFF, max_deliver=10)
async def on_stock_reserved(event: StockReserved, ctx: Context) -> None:
    await settle(ctx, await apply(ctx, event.order_id, stock_reserved))


@service.subscribe(STOCK_REJECTED, backoff=BACKOFF, max_deliver=10)
async def on_stock_rejected(event: StockRejected, ctx: Context) -> None:
    order = await apply(ctx, event.order_id, lambda order: cancel(order, event.reason))
    await settle(ctx, order)


@service.subscribe(PAYMENT_CAPTURED, backoff=BACKOFF, max_deliver=10)
async def on_payment_captured(event: PaymentCaptured, ctx: Context) -> None:
    await settle(ctx, await apply(ctx, event.order_id, payment_captured(event)))


@service.subscribe(PAYMENT_FAILED, backoff=BACKOFF, max_deliver=10)
async def on_payment_failed(event: PaymentFailed, ctx: Context) -> None:
    await settle(ctx, await apply(ctx, event.order_id, payment_failed(event)))


@service.subscribe(PAYMENT_REFUNDED, backoff=BACKOFF, max_deliver=10)
async def on_payment_refunded(event: PaymentRefunded, ctx: Context) -> None:
    await settle(ctx, await apply(ctx, event.order_id, payment_refunded(event)))


@service.subscribe(ORDER_EXPIRED, backoff=BACKOFF, max_deliver=10)
async def on_order_expired(event: OrderExpired, ctx: Context) -> None:
    """The deadline fired (the server published this): cancel whatever is not final."""
    if fold(await ctx.history("order", event.order_id)) is None:
        return  # the order was never created (its create request failed after scheduling)
    await settle(ctx, await apply(ctx, event.order_id, expired))


# --- the deadline: an ADR-51 message schedule -------------------------------------------

_schedules_allowed: weakref.WeakSet[Client] = weakref.WeakSet()


async def schedule_deadline(ctx: Context, order_id: str) -> None:
    """The server publishes order.expired.v1 for the order at now + ORDER_TIMEOUT.

    The schedule is a message on its own subject (one schedule per subject) whose
    headers say when and where to publish its body; the produced message keeps the
    other headers, so it carries the order's correlation id like any event of ours.
    """
    await allow_schedules(ctx.client)
    at = datetime.now(UTC) + timedelta(seconds=ORDER_TIMEOUT)
    headers = {
        "Nats-Schedule": f"@at {at.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}",
        "Nats-Schedule-Target": f"events.{ORDER_EXPIRED}.{order_id}",
        "Event-Type": ORDER_EXPIRED,
        "Correlation-Id": ctx.correlation_id,
        "Producer": service.name,
    }
    body = msgspec.json.encode(OrderExpired(order_id, ORDER_TIMEOUT))
    await ctx.client.js.publish(f"events.order.deadline.{order_id}", body, headers=headers)


async def cancel_deadline(client: Client, order_id: str) -> None:
    """A final order's schedule is purged (a deadline that fires anyway changes nothing)."""
    await client.js.purge_stream(ORDER_STREAM, subject=f"events.order.deadline.{order_id}")


async def allow_schedules(client: Client) -> None:
    """The order stream allows message schedules (turned on if another service created
    it first with the domain defaults)."""
    if client in _schedules_allowed:
        return
    info = await client.js.stream_info(ORDER_STREAM)
    if not info.config.allow_msg_schedules:
        config = info.config
        config.allow_msg_schedules = True
        await client.js.update_stream(config)
    _schedules_allowed.add(client)


# --- requests ---------------------------------------------------------------------------


@service.rpc("create")
async def create(req: CreateOrder, ctx: Context) -> Order:
    """Take the order (its deadline scheduled first, so no order ever lacks one); the
    same idempotency key answers the same order."""
    order_id, total = new_order_id(req), total_of(req)
    order = fold(await ctx.history("order", order_id))
    if order is None:
        await schedule_deadline(ctx, order_id)
        created = OrderCreated(order_id, req.customer_id, total, req.items)
        try:
            await ctx.publish(
                ORDER_CREATED,
                created,
                key=order_id,
                event_id=f"{order_id}-created",
                expected_last_subject_sequence=0,
            )
        except ConcurrencyConflict:
            pass  # a retry of this request created it meanwhile
        order = fold(await ctx.history("order", order_id))
        assert order is not None
        ctx.log.info("order created", order_id=order_id, total_cents=total)
    if order.items != req.items or order.customer_id != req.customer_id:
        raise BadRequest("idempotency_key was already used for a different order")
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
    """The fold of the order's events."""
    order = fold(await ctx.history("order", req.order_id))
    if order is None:
        raise NotFound(f"no order {req.order_id}")
    return order


@service.rpc("history")
async def history(req: GetOrder, ctx: Context) -> OrderHistory:
    """The order's events as stored (its timeline), and what they fold to."""
    records = await ctx.history("order", req.order_id)
    order = fold(records)
    if order is None:
        raise NotFound(f"no order {req.order_id}")
    return OrderHistory(order, [timeline_entry(record) for record in records])


def timeline_entry(record: EventRecord) -> TimelineEntry:
    data: Any = msgspec.json.decode(record.data)
    stamp = record.time.isoformat().replace("+00:00", "Z")
    return TimelineEntry(record.sequence, record.type, stamp, data)


@service.rpc("list")
async def list_orders(req: ListOrders, ctx: Context) -> list[Order]:
    """From the read model (eventually consistent: it follows the events)."""
    return await views.list_orders(ctx.client, req)


@service.rpc("customer")
async def customer(req: CustomerQuery, ctx: Context) -> CustomerOrders:
    """Read model: the customer's orders by status and what they spent."""
    return await views.customer(ctx.client, req.customer_id, req.view)


@service.rpc("revenue")
async def revenue(req: RevenueQuery, ctx: Context) -> list[DailyRevenue]:
    """Read model: confirmed orders and revenue per day, the latest `days` days."""
    return await views.revenue(ctx.client, req.days, req.view)


if __name__ == "__main__":
    service.run()
