"""The sample mesh's shared contracts: requests, replies and events, all msgspec Structs.

Every service imports its types from here, so a field renamed on one side is a type
error on the other. Field constraints (`Meta`) are checked when a message is decoded:
a request that breaks them is answered with 400 and msgspec's message, naming the field.
Events are versioned by type name; a breaking change gets a new `.vN` type.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# Event types: `<domain>.<action>.v<N>`, each domain kept in its own stream. Every event
# of the shop is keyed by its order id (`events.order.created.v1.<order_id>`), so one
# order's events can be read back in order (`client.history("order", order_id)`).
ORDER_CREATED = "order.created.v1"
ORDER_RESERVED = "order.reserved.v1"  # orders noted: inventory holds the stock
ORDER_PAID = "order.paid.v1"  # orders noted: payments captured the money
ORDER_CONFIRMED = "order.confirmed.v1"
ORDER_CANCELLED = "order.cancelled.v1"
ORDER_REFUNDED = "order.refunded.v1"  # orders noted: payments gave the money back
ORDER_EXPIRED = "order.expired.v1"  # the saga deadline (a scheduled message) passed
PAYMENT_CAPTURED = "payment.captured.v1"
PAYMENT_FAILED = "payment.failed.v1"
PAYMENT_REFUNDED = "payment.refunded.v1"
STOCK_RESERVED = "stock.reserved.v1"
STOCK_REJECTED = "stock.rejected.v1"
STOCK_RELEASED = "stock.released.v1"
STOCK_COMMITTED = "stock.committed.v1"
RECEIPT_RENDERED = "receipt.rendered.v1"

Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Sku = Annotated[str, Meta(min_length=1, max_length=64)]
Cents = Annotated[int, Meta(ge=0)]
OrderStatus = Literal["pending", "confirmed", "cancelled", "refunded"]
# voided: the order was cancelled before it was charged, so it never will be
PaymentStatus = Literal["pending", "captured", "declined", "refunded", "voided"]


# --- orders -----------------------------------------------------------------------------


class OrderItem(msgspec.Struct, frozen=True):
    sku: Sku
    quantity: Annotated[int, Meta(ge=1, le=1000)]
    unit_price_cents: Cents


class CreateOrder(msgspec.Struct, frozen=True):
    customer_id: Id
    items: Annotated[list[OrderItem], Meta(min_length=1, max_length=100)]
    # The same key from the same customer creates the order once: a retried request
    # gets the first order back instead of a second one.
    idempotency_key: Id | None = None


class Order(msgspec.Struct, frozen=True, omit_defaults=True):
    """An order as the fold of its events (see `services.orders.fold`)."""

    id: str
    customer_id: str
    items: list[OrderItem]
    total_cents: int
    status: OrderStatus
    payment_id: str | None = None
    reason: str | None = None  # why it was cancelled, or refunded
    stock_reserved: bool = False  # the saga's steps done so far
    paid: bool = False
    refunded: bool = False  # money given back (a refund, or a cancelled order's compensation)
    created_at: str | None = None  # RFC 3339, when the stream stored order.created
    version: int = 0  # the stream sequence of its last event


class GetOrder(msgspec.Struct, frozen=True):
    order_id: Id


class ListOrders(msgspec.Struct, frozen=True):
    customer_id: Id | None = None
    status: OrderStatus | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class TimelineEntry(msgspec.Struct, frozen=True):
    sequence: int
    type: str
    time: str  # RFC 3339
    data: dict[str, object]


class OrderHistory(msgspec.Struct, frozen=True):
    """`orders.history`: the order's events as stored, and what they fold to."""

    order: Order
    events: list[TimelineEntry]


class CustomerQuery(msgspec.Struct, frozen=True):
    customer_id: Id
    view: Id | None = None  # a read-model generation; default: the service's own


class CustomerOrders(msgspec.Struct, frozen=True):
    """Read model: a customer's orders, their statuses and what they spent."""

    customer_id: str
    orders: dict[str, OrderStatus] = msgspec.field(default_factory=dict)
    spent_cents: int = 0

    def count(self, status: OrderStatus) -> int:
        return sum(1 for s in self.orders.values() if s == status)


class RevenueQuery(msgspec.Struct, frozen=True):
    days: Annotated[int, Meta(ge=1, le=366)] = 30
    view: Id | None = None


class DailyRevenue(msgspec.Struct, frozen=True):
    """Read model: confirmed orders and their revenue, per day (UTC) of confirmation."""

    day: str  # YYYY-MM-DD
    orders: int
    revenue_cents: int


class OrderCreated(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    total_cents: int
    items: list[OrderItem] = msgspec.field(default_factory=list)


class OrderReserved(msgspec.Struct, frozen=True):
    order_id: str


class OrderPaid(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str
    amount_cents: int


class OrderRefunded(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str
    amount_cents: int
    reason: str
    customer_id: str = ""
    status: OrderStatus = "refunded"  # the order's status after it: refunded, or cancelled


class OrderExpired(msgspec.Struct, frozen=True):
    """Published by the server at the saga deadline (an ADR-51 `@at` message schedule)."""

    order_id: str
    timeout_seconds: float


class OrderConfirmed(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    payment_id: str
    total_cents: int


class OrderCancelled(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    reason: str
    total_cents: int = 0


# --- payments ---------------------------------------------------------------------------


class Payment(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    order_id: str
    amount_cents: int
    status: PaymentStatus
    reason: str | None = None  # why it was declined or refunded


class GetPayment(msgspec.Struct, frozen=True):
    order_id: Id


class Refund(msgspec.Struct, frozen=True):
    order_id: Id
    reason: Annotated[str, Meta(max_length=200)] = "requested by customer"


class PaymentCaptured(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str
    amount_cents: int


class PaymentFailed(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str
    reason: str


class PaymentRefunded(msgspec.Struct, frozen=True):
    order_id: str
    payment_id: str
    amount_cents: int
    reason: str


# --- inventory --------------------------------------------------------------------------


class StockLine(msgspec.Struct, frozen=True):
    sku: str
    quantity: int


class StockItem(msgspec.Struct, frozen=True):
    """One SKU's stock. available + reserved + sold == received, always."""

    sku: str
    name: str
    available: int
    reserved: int = 0  # held for orders not yet confirmed (sum of `holds`)
    sold: int = 0
    received: int = 0  # everything ever put on the shelf: the seed plus restocks
    holds: dict[str, int] = msgspec.field(default_factory=dict)  # order id -> quantity


class Restock(msgspec.Struct, frozen=True):
    sku: Sku
    quantity: Annotated[int, Meta(ge=1, le=1_000_000)]
    name: Annotated[str, Meta(max_length=200)] | None = None  # for a new SKU


class GetStock(msgspec.Struct, frozen=True):
    sku: Sku


class StockReserved(msgspec.Struct, frozen=True):
    order_id: str
    lines: list[StockLine]


class StockRejected(msgspec.Struct, frozen=True):
    order_id: str
    reason: str


class StockReleased(msgspec.Struct, frozen=True):
    order_id: str
    lines: list[StockLine]


class StockCommitted(msgspec.Struct, frozen=True):
    order_id: str
    lines: list[StockLine]


# --- receipts ---------------------------------------------------------------------------


class RenderReceipt(msgspec.Struct, frozen=True):
    """The `receipts.render` job's payload: everything the receipt shows."""

    order_id: Id
    customer_id: Id
    items: list[OrderItem]
    total_cents: Cents
    payment_id: str


class RenderedReceipt(msgspec.Struct, frozen=True):
    """The job's result; the text itself is stored in the "receipts" bucket."""

    order_id: str
    receipt_id: str
    lines: int
    total_cents: int


class ReceiptRendered(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    receipt_id: str
    text: str


class GetReceipt(msgspec.Struct, frozen=True):
    order_id: Id


# --- notifications ----------------------------------------------------------------------


class Notification(msgspec.Struct, frozen=True):
    id: str  # one per order and kind: what makes sending it exactly-once
    customer_id: str
    order_id: str
    kind: Literal["order_confirmed", "order_cancelled", "receipt"]
    message: str
