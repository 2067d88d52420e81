"""Payments: charge each order exactly once, through a simulated card provider.

    order.created.v1   --> charge --> payment.captured.v1 | payment.failed.v1
    order.cancelled.v1 --> refund a captured payment --> payment.refunded.v1  (compensation)

Charging twice is the one mistake a payment service must never make, even when an event
is redelivered, published twice or handled by two replicas at once. So the "payments"
bucket holds one payment per order, created with `kv.create` (only if absent): every
delivery agrees on that one payment, and the provider gets its id as idempotency key.
A delivery that finds the payment settled only re-publishes the outcome, under an
event id the stream has already stored. Every event is keyed by the order id.

The saga's compensation is order-independent too: a cancelled order whose payment was
captured is refunded; one cancelled before it was charged gets a "voided" payment, so a
late order.created.v1 never charges it; one whose charge is in flight is retried until
the charge has settled (then refunded).

Environment: `PAYMENTS_FAILURE_RATE` (0..1, default 0) makes the provider decline that
share of orders (decided per payment, so a redelivery decides the same);
`PAYMENTS_FLAKY_RATE` (0..1, default 0) makes that share of charge attempts fail
transiently, to watch retries with backoff; `PAYMENTS_LEDGER=path` records every charge
and refund the provider makes.
"""

from __future__ import annotations

import os
import random
import uuid
from typing import Any

import anyio
import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from framework import Context, Service, ServiceError
from services.buckets import Bucket, read, read_existing
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CREATED,
    PAYMENT_CAPTURED,
    PAYMENT_FAILED,
    PAYMENT_REFUNDED,
    GetPayment,
    OrderCancelled,
    OrderCreated,
    Payment,
    PaymentCaptured,
    PaymentFailed,
    PaymentRefunded,
    Refund,
)

DECLINE_ABOVE_CENTS = 100_000


class ProviderUnavailable(Exception):
    """A transient provider failure: the event is retried with backoff."""


class ChargeInFlight(Exception):
    """A cancelled order's charge has not settled yet: the refund is retried later."""


class SimulatedProvider:
    """A card processor stand-in: declines (over a limit, or a share of cards), optional
    transient failures; a charge or refund with a known idempotency key is made once."""

    def __init__(
        self, failure_rate: float = 0.0, ledger: str = "", *, flaky_rate: float = 0.0
    ) -> None:
        self.failure_rate = failure_rate
        self.flaky_rate = flaky_rate
        self.ledger = ledger
        self.charged: dict[str, int] = {}  # charges really made: idempotency key -> cents
        self.refunded: set[str] = set()

    async def charge(self, key: str, amount_cents: int, order_id: str = "") -> str | None:
        """Capture the amount; returns None, or the reason it was declined."""
        if random.random() < self.flaky_rate:
            raise ProviderUnavailable("card network timeout (simulated)")
        if amount_cents > DECLINE_ABOVE_CENTS:
            return f"amount {amount_cents} cents is above the limit of {DECLINE_ABOVE_CENTS} cents"
        if random.Random(key).random() < self.failure_rate:  # the same answer for the same card
            return "card declined by the issuer (simulated)"
        self.charged.setdefault(key, amount_cents)  # a known key is the same charge again
        await self._record("charge", key, amount_cents, order_id)
        return None

    async def refund(self, key: str, amount_cents: int = 0, order_id: str = "") -> None:
        self.refunded.add(key)
        await self._record("refund", key, amount_cents, order_id)

    async def _record(self, kind: str, key: str, amount_cents: int, order_id: str) -> None:
        """`PAYMENTS_LEDGER=path`: the provider's own record of charges and refunds, one
        JSON line per call (what the end-to-end test counts to prove that no order was
        charged twice and each cancelled one refunded once)."""
        if not self.ledger:
            return
        line = {"kind": kind, "key": key, "order_id": order_id, "amount_cents": amount_cents}
        await anyio.to_thread.run_sync(self._append, msgspec.json.encode(line) + b"\n")

    def _append(self, line: bytes) -> None:
        with open(self.ledger, "ab") as out:
            out.write(line)


provider = SimulatedProvider(
    float(os.environ.get("PAYMENTS_FAILURE_RATE", "0") or 0),
    os.environ.get("PAYMENTS_LEDGER", ""),
    flaky_rate=float(os.environ.get("PAYMENTS_FLAKY_RATE", "0") or 0),
)

service = Service(
    "payments",
    version="1.0.0",
    description="Charges orders once each; refunds them on request",
    publishes=[PAYMENT_CAPTURED, PAYMENT_FAILED, PAYMENT_REFUNDED],
)
payments = Bucket("payments", "one payment per order, by order id")


@service.subscribe(ORDER_CREATED, max_deliver=6, backoff=[0.5, 1, 2, 5, 10])
async def on_order_created(event: OrderCreated, ctx: Context) -> None:
    kv = await payments.open(ctx.client)
    payment, revision = await payment_for(kv, event)
    if payment.status == "pending":
        reason = await provider.charge(payment.id, payment.amount_cents, payment.order_id)
        status = "declined" if reason else "captured"
        payment = msgspec.structs.replace(payment, status=status, reason=reason)
        # Fails if a racing delivery settled it first; the retry then finds it settled.
        await kv.update(event.order_id, msgspec.json.encode(payment), last=revision)
        ctx.log.info("payment settled", order_id=event.order_id, status=status)
    key = payment.order_id
    if payment.status in ("captured", "refunded"):  # (refunded: captured first)
        captured = PaymentCaptured(payment.order_id, payment.id, payment.amount_cents)
        await ctx.publish(PAYMENT_CAPTURED, captured, key=key, event_id=f"{payment.id}-captured")
    elif payment.status == "declined":
        failed = PaymentFailed(payment.order_id, payment.id, payment.reason or "declined")
        await ctx.publish(PAYMENT_FAILED, failed, key=key, event_id=f"{payment.id}-failed")


@service.subscribe(ORDER_CANCELLED, max_deliver=12, backoff=[0.5, 1, 2, 5, 10, 15, 30])
async def on_order_cancelled(event: OrderCancelled, ctx: Context) -> None:
    """Compensation: a captured payment is refunded, one not made yet never will be."""
    kv = await payments.open(ctx.client)
    reason = f"order cancelled: {event.reason}"
    voided = Payment(f"pay-{uuid.uuid4().hex[:20]}", event.order_id, 0, "voided", reason)
    try:
        await kv.create(event.order_id, msgspec.json.encode(voided))
        ctx.log.info("payment voided", order_id=event.order_id)
        return
    except KeyWrongLastSequenceError:
        pass  # the order has a payment: settle it
    found = await read(kv, event.order_id, Payment)
    if found is not None and found[0].status == "pending":
        raise ChargeInFlight(f"the charge of {event.order_id} has not settled yet")
    if found is not None and found[0].status in ("captured", "refunded"):
        await refund_payment(ctx, event.order_id, reason)


async def payment_for(kv: Any, event: OrderCreated) -> tuple[Payment, int]:
    """The order's one payment: created by this delivery, or found from an earlier one."""
    new = Payment(f"pay-{uuid.uuid4().hex[:20]}", event.order_id, event.total_cents, "pending")
    try:
        return new, await kv.create(event.order_id, msgspec.json.encode(new))
    except KeyWrongLastSequenceError:
        found = await read(kv, event.order_id, Payment)
        if found is None:  # deleted between the two calls: let the retry start over
            raise
        return found


@service.rpc("get")
async def get(req: GetPayment, ctx: Context) -> Payment:
    kv = await payments.open(ctx.client)
    missing = f"no payment for order {req.order_id}"
    payment, _ = await read_existing(kv, req.order_id, Payment, missing)
    return payment


@service.rpc("refund")
async def refund(req: Refund, ctx: Context) -> Payment:
    """Give a captured payment back. Refunding twice answers the same."""
    return await refund_payment(ctx, req.order_id, req.reason)


async def refund_payment(ctx: Context, order_id: str, reason: str) -> Payment:
    """The refund made once (the provider gets the payment id as idempotency key), and
    announced again by every call, under the same event id."""
    kv = await payments.open(ctx.client)
    while True:
        missing = f"no payment for order {order_id}"
        payment, revision = await read_existing(kv, order_id, Payment, missing)
        if payment.status != "captured":
            break
        await provider.refund(payment.id, payment.amount_cents, order_id)
        payment = msgspec.structs.replace(payment, status="refunded", reason=reason)
        try:
            await kv.update(order_id, msgspec.json.encode(payment), last=revision)
            break
        except KeyWrongLastSequenceError:
            continue  # changed meanwhile (a concurrent refund): look again
    if payment.status != "refunded":
        raise ServiceError(
            409, f"payment {payment.id} is {payment.status}: only a captured one can be refunded"
        )
    refunded = PaymentRefunded(
        payment.order_id, payment.id, payment.amount_cents, payment.reason or reason
    )
    await ctx.publish(PAYMENT_REFUNDED, refunded, key=order_id, event_id=f"{payment.id}-refunded")
    return payment


if __name__ == "__main__":
    service.run()
