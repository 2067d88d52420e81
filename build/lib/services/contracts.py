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

# Event types: `<domain>.<action>.v<N>`, each domain kept in its own stream.
ORDER_CREATED = "order.created.v1"
ORDER_CONFIRMED = "order.confirmed.v1"
ORDER_CANCELLED = "order.cancelled.v1"
PAYMENT_CAPTURED = "payment.captured.v1"
PAYMENT_FAILED = "payment.failed.v1"
PAYMENT_REFUNDED = "payment.refunded.v1"

Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Cents = Annotated[int, Meta(ge=0)]
OrderStatus = Literal["pending", "confirmed", "cancelled", "refunded"]
PaymentStatus = Literal["pending", "captured", "declined", "refunded"]


# --- orders -----------------------------------------------------------------------------


class OrderItem(msgspec.Struct, frozen=True):
    sku: Annotated[str, Meta(min_length=1, max_length=64)]
    quantity: Annotated[int, Meta(ge=1, le=1000)]
    unit_price_cents: Cents


class CreateOrder(msgspec.Struct, frozen=True):
    customer_id: Id
    items: Annotated[list[OrderItem], Meta(min_length=1, max_length=100)]
    # The same key from the same customer creates the order once: a retried request
    # gets the first order back instead of a second one.
    idempotency_key: Id | None = None


class Order(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    customer_id: str
    items: list[OrderItem]
    total_cents: int
    status: OrderStatus
    payment_id: str | None = None
    reason: str | None = None  # why it was cancelled


class GetOrder(msgspec.Struct, frozen=True):
    order_id: Id


class ListOrders(msgspec.Struct, frozen=True):
    customer_id: Id | None = None
    status: OrderStatus | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class OrderCreated(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    total_cents: int


class OrderConfirmed(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    payment_id: str
    total_cents: int


class OrderCancelled(msgspec.Struct, frozen=True):
    order_id: str
    customer_id: str
    reason: str


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


# --- notifications ----------------------------------------------------------------------


class Notification(msgspec.Struct, frozen=True):
    id: str  # one per order and kind: what makes sending it exactly-once
    customer_id: str
    order_id: str
    kind: Literal["order_confirmed", "order_cancelled"]
    message: str
