"""Notifications: tell the customer when an order is confirmed or cancelled, and send
the receipt once it is rendered, each exactly once.

Each notification has an id (order id + kind). Before sending, a delivery claims that id
in the "notifications" bucket with `kv.create`; once sent, the claim becomes "sent".
A duplicate event finds "sent" and does nothing; a racing replica finds the claim and
retries later; a failed send releases its claim, so the retry sends it.

The sender is pluggable: assign any object with `async send(notification)` to
`services.notifications.sender`. The default appends JSON lines to an outbox file
(`MESH_OUTBOX`, default `.mesh/outbox.jsonl`). `NOTIFICATIONS_FLAKY=N` makes the first N
sends of each notification fail: 1 or 2 shows retries; 5 or more (max_deliver) ends in
a dead letter, which `mesh dlq replay` then delivers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Literal, Protocol

import anyio
import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from framework import Context, Service
from services.buckets import Bucket
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    RECEIPT_RENDERED,
    Notification,
    OrderCancelled,
    OrderConfirmed,
    ReceiptRendered,
)

CLAIM_LEASE_SECONDS = 60.0  # a claim older than this belongs to a delivery that died


class Sender(Protocol):
    async def send(self, notification: Notification) -> None: ...


class OutboxSender:
    """Appends one JSON line per notification to a file: a stand-in for email or SMS."""

    def __init__(self, path: str) -> None:
        self.path = anyio.Path(path)

    async def send(self, notification: Notification) -> None:
        await self.path.parent.mkdir(parents=True, exist_ok=True)
        async with await anyio.open_file(self.path, "ab") as outbox:
            await outbox.write(msgspec.json.encode(notification) + b"\n")


class FlakySender:
    """Fails the first `failures` sends of each notification, then passes them on."""

    def __init__(self, inner: Sender, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.attempts: Counter[str] = Counter()

    async def send(self, notification: Notification) -> None:
        self.attempts[notification.id] += 1
        attempt = self.attempts[notification.id]
        if attempt <= self.failures:
            raise ConnectionError(f"mail server unavailable (simulated, {attempt}/{self.failures})")
        await self.inner.send(notification)


def sender_from_env() -> Sender:
    outbox = OutboxSender(os.environ.get("MESH_OUTBOX", ".mesh/outbox.jsonl"))
    failures = int(os.environ.get("NOTIFICATIONS_FLAKY", "0") or 0)
    return FlakySender(outbox, failures) if failures > 0 else outbox


sender: Sender = sender_from_env()

service = Service(
    "notifications",
    version="1.0.0",
    description="Tells customers about their orders, once per order and kind",
)
sent = Bucket("notifications", "notification ids claimed or sent", ttl=30 * 24 * 3600.0)


@service.subscribe(ORDER_CONFIRMED, max_deliver=5, backoff=[0.2, 0.5, 1, 2])
async def on_order_confirmed(event: OrderConfirmed, ctx: Context) -> None:
    message = f"Your order {event.order_id} is confirmed: {event.total_cents / 100:.2f} paid."
    await notify(ctx, about(event.order_id, event.customer_id, "confirmed", message))


@service.subscribe(ORDER_CANCELLED, max_deliver=5, backoff=[0.2, 0.5, 1, 2])
async def on_order_cancelled(event: OrderCancelled, ctx: Context) -> None:
    message = f"Your order {event.order_id} was cancelled: {event.reason}."
    await notify(ctx, about(event.order_id, event.customer_id, "cancelled", message))


@service.subscribe(RECEIPT_RENDERED, max_deliver=5, backoff=[0.2, 0.5, 1, 2])
async def on_receipt_rendered(event: ReceiptRendered, ctx: Context) -> None:
    await notify(ctx, about(event.order_id, event.customer_id, "receipt", event.text))


KINDS: dict[str, Literal["order_confirmed", "order_cancelled", "receipt"]] = {
    "confirmed": "order_confirmed",
    "cancelled": "order_cancelled",
    "receipt": "receipt",
}


def about(
    order_id: str,
    customer_id: str,
    outcome: Literal["confirmed", "cancelled", "receipt"],
    message: str,
) -> Notification:
    """One notification per order and outcome: its id is what makes sending it once."""
    return Notification(
        id=f"{order_id}-{outcome}",
        customer_id=customer_id,
        order_id=order_id,
        kind=KINDS[outcome],
        message=message,
    )


async def notify(ctx: Context, notification: Notification) -> None:
    kv = await sent.open(ctx.client)
    claim = await claim_for(kv, notification.id)
    if claim is None:
        ctx.log.info("notification already sent", notification_id=notification.id)
        return
    try:
        await sender.send(notification)
    except Exception:
        await kv.delete(notification.id, last=claim)  # released: the retry sends it
        raise
    await kv.put(notification.id, b"sent")
    ctx.log.info("notification sent", notification_id=notification.id)


async def claim_for(kv: Any, key: str) -> int | None:
    """Our claim's revision; None if already sent; raises while another delivery sends."""
    claim = f"sending {time.time():.3f}".encode()
    try:
        revision: int = await kv.create(key, claim)
        return revision
    except KeyWrongLastSequenceError:
        entry = await kv.get(key)
    if entry.value == b"sent":
        return None
    claimed_at = float(entry.value.split()[1])
    if time.time() - claimed_at < CLAIM_LEASE_SECONDS:
        raise RuntimeError(f"notification {key} is being sent by another delivery")
    revision = await kv.update(key, claim, last=entry.revision)  # take over a dead claim
    return revision


if __name__ == "__main__":
    service.run()
