"""Receipts: a background job renders the receipt of each confirmed order.

    orders --enqueue receipts.render (job id = order id)--> render, with progress
           --> stored in the "receipts" bucket --> receipt.rendered.v1 --> notifications

A job, not an event handler: rendering is a command to one worker pool, with a status
anyone can watch (`mesh jobs show receipts.render <order_id>`, the dashboard, the
gateway's SSE stream) and retries with backoff. The job id is the order id, so enqueueing
it again (a redelivered confirmation) finds the same job instead of a second receipt.

Environment: `RECEIPTS_LINE_DELAY` (seconds per line, default 0.05) makes rendering take
long enough to watch its progress.
"""

from __future__ import annotations

import os

import anyio
import msgspec

from framework import Context, JobContext, NotFound, Service
from services.buckets import Bucket, read
from services.contracts import (
    RECEIPT_RENDERED,
    GetReceipt,
    ReceiptRendered,
    RenderedReceipt,
    RenderReceipt,
)

LINE_DELAY = float(os.environ.get("RECEIPTS_LINE_DELAY", "0.05") or 0)
RENDER = "receipts.render"

service = Service(
    "receipts",
    version="1.0.0",
    description="Renders and stores the receipt of every confirmed order",
    publishes=[RECEIPT_RENDERED],
)
stored = Bucket("receipts", "rendered receipts by order id")


class StoredReceipt(msgspec.Struct, frozen=True):
    receipt_id: str
    order_id: str
    customer_id: str
    text: str


@service.job("render", max_concurrency=4, timeout=60, max_attempts=5, backoff=[1, 5, 15, 30])
async def render(req: RenderReceipt, job: JobContext) -> RenderedReceipt:
    """One line per item (progress after each), stored, then announced."""
    lines = [f"Receipt for order {req.order_id}", f"Customer {req.customer_id}", ""]
    for number, item in enumerate(req.items, 1):
        amount = item.quantity * item.unit_price_cents / 100
        lines.append(f"{item.quantity:>5} x {item.sku:<24} {amount:>12.2f}")
        await job.progress(number / (len(req.items) + 1), f"line {number} of {len(req.items)}")
        await anyio.sleep(LINE_DELAY)
    lines += ["", f"{'Total':<32} {req.total_cents / 100:>12.2f}", f"Paid ({req.payment_id})"]
    receipt = StoredReceipt(f"rcpt-{req.order_id}", req.order_id, req.customer_id, "\n".join(lines))
    kv = await stored.open(job.client)
    await kv.put(req.order_id, msgspec.json.encode(receipt))  # the same receipt, if run again
    rendered = ReceiptRendered(req.order_id, req.customer_id, receipt.receipt_id, receipt.text)
    await job.publish(
        RECEIPT_RENDERED, rendered, key=req.order_id, event_id=f"{receipt.receipt_id}-rendered"
    )
    await job.progress(1.0, "stored and sent to notifications")
    return RenderedReceipt(req.order_id, receipt.receipt_id, len(req.items), req.total_cents)


@service.rpc("get")
async def get(req: GetReceipt, ctx: Context) -> StoredReceipt:
    """The stored receipt of an order (404 until it is rendered)."""
    kv = await stored.open(ctx.client)
    found = await read(kv, req.order_id, StoredReceipt)
    if found is None:
        raise NotFound(f"no receipt for order {req.order_id}")
    return found[0]


if __name__ == "__main__":
    service.run()
