"""Inventory: stock per SKU, held for an order until it is confirmed or cancelled.

    order.created.v1   --> reserve every line, or none --> stock.reserved.v1 | stock.rejected.v1
    order.cancelled.v1 --> release what was reserved  --> stock.released.v1   (compensation)
    order.confirmed.v1 --> the held stock is sold     --> stock.committed.v1

The "inventory" bucket holds one entry per SKU (`sku.<sku>`: available, reserved, sold,
received and the holds per order) and one per order (`order.<order_id>`: what was
reserved, and where that stands). Every change of an order is one atomic batch
(ADR-50) over the order's entry and each of its SKUs, each guarded by the revision it
was read at: all keys change or none does, a concurrent change makes the batch fail
and the handler decide again on fresh values. Hence, per SKU and at any moment:

    available >= 0, reserved == sum(holds), available + reserved + sold == received

An order's entry is written before its event is published, so a redelivery finds the
decision made and publishes the same event id again (stored once). A cancellation that
arrives before the order was reserved leaves a "void" entry, so the late
order.created.v1 reserves nothing: every transition holds in whatever order the events
come. An unknown SKU is rejected like one out of stock.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from nats.js.errors import KeyWrongLastSequenceError

from framework import Context, NotFound, Reject, Service
from services.buckets import Bucket, Conflict, Write, keys_matching, read, write_all
from services.contracts import (
    ORDER_CANCELLED,
    ORDER_CONFIRMED,
    ORDER_CREATED,
    STOCK_COMMITTED,
    STOCK_REJECTED,
    STOCK_RELEASED,
    STOCK_RESERVED,
    GetStock,
    OrderCancelled,
    OrderConfirmed,
    OrderCreated,
    Restock,
    StockCommitted,
    StockItem,
    StockLine,
    StockRejected,
    StockReleased,
    StockReserved,
)

# The shop's shelves when it opens (a SKU already in the bucket keeps its counts).
SEED_CATALOG: dict[str, tuple[str, int]] = {
    "book-dune": ("Dune, paperback", 1000),
    "mug-owl": ("Owl mug", 1000),
    "pen-ink": ("Fountain pen", 2000),
    "lamp-arc": ("Arc floor lamp", 200),
    "bike-road": ("Road bike", 50),
    "piano-grand": ("Grand piano", 2),
    "kite-red": ("Red kite (sold out)", 0),
}

ReservationStatus = Literal["reserved", "rejected", "released", "committed", "void"]
RETRIES = 50  # concurrent changes of the same SKUs one delivery will out-wait


class Reservation(msgspec.Struct, frozen=True, omit_defaults=True):
    """What inventory decided for one order."""

    order_id: str
    status: ReservationStatus
    lines: list[StockLine] = msgspec.field(default_factory=list)
    reason: str | None = None


service = Service(
    "inventory",
    version="1.0.0",
    description="Holds stock for orders: reserves, releases, commits; never below zero",
    publishes=[STOCK_RESERVED, STOCK_REJECTED, STOCK_RELEASED, STOCK_COMMITTED],
)
stock = Bucket("inventory", "stock per SKU and reservations per order", atomic=True)
_seeded: weakref.WeakSet[Any] = weakref.WeakSet()


async def open_stock(ctx: Context) -> Any:
    """The bucket, with the seed catalog put on the shelves on first use."""
    kv = await stock.open(ctx.client)
    if kv not in _seeded:
        for sku, (name, quantity) in SEED_CATALOG.items():
            item = StockItem(sku, name, available=quantity, received=quantity)
            try:
                await kv.create(f"sku.{sku}", msgspec.json.encode(item))
            except KeyWrongLastSequenceError:  # there already: its counts are the truth
                pass
        _seeded.add(kv)
    return kv


# --- events -----------------------------------------------------------------------------


# Handlers take milliseconds: a delivery lost with a killed process comes back after 10 s.
OPTIONS: dict[str, Any] = {"backoff": [0.2, 0.5, 1, 2, 5], "max_deliver": 8, "ack_wait": 10.0}


@service.subscribe(ORDER_CREATED, **OPTIONS)
async def on_order_created(event: OrderCreated, ctx: Context) -> None:
    """Reserve every line of the order, or none of them."""
    lines = [StockLine(item.sku, item.quantity) for item in event.items]
    skus = [line.sku for line in lines]
    reservation = await change(ctx, event.order_id, reserve(event.order_id, lines), skus)
    await announce(ctx, reservation)


@service.subscribe(ORDER_CANCELLED, **OPTIONS)
async def on_order_cancelled(event: OrderCancelled, ctx: Context) -> None:
    """Compensation: give back what the order held (and never reserve for it later)."""
    reservation = await change(ctx, event.order_id, release(event.order_id), None)
    await announce(ctx, reservation)


@service.subscribe(ORDER_CONFIRMED, **OPTIONS)
async def on_order_confirmed(event: OrderConfirmed, ctx: Context) -> None:
    """The held stock leaves the shelf for good."""
    reservation = await change(ctx, event.order_id, commit(event.order_id), None)
    await announce(ctx, reservation)


async def announce(ctx: Context, reservation: Reservation) -> None:
    """The event for where the reservation stands (again, after a redelivery: same id)."""
    oid = reservation.order_id
    event: tuple[str, msgspec.Struct] | None = {
        "reserved": (STOCK_RESERVED, StockReserved(oid, reservation.lines)),
        "rejected": (STOCK_REJECTED, StockRejected(oid, reservation.reason or "rejected")),
        "released": (STOCK_RELEASED, StockReleased(oid, reservation.lines)),
        "committed": (STOCK_COMMITTED, StockCommitted(oid, reservation.lines)),
    }.get(reservation.status)
    if event is not None:
        event_type, payload = event
        await ctx.publish(event_type, payload, key=oid, event_id=f"{oid}-{event_type}")


# --- transitions ------------------------------------------------------------------------

Items = dict[str, tuple[StockItem, int]]  # sku -> (item, revision)
Decision = tuple[Reservation, list[StockItem]]  # the new reservation, the changed SKUs
Decide = Callable[[Reservation | None, Items], Decision | None]


async def change(
    ctx: Context, order_id: str, decide: Decide, skus: list[str] | None
) -> Reservation:
    """Read the order's entry and its SKUs, decide, write it all atomically; again on a
    conflict. `decide(found, items)` returns None (nothing to change) or a Decision."""
    kv = await open_stock(ctx)
    for _ in range(RETRIES):
        found = await read(kv, f"order.{order_id}", Reservation)
        wanted = skus if found is None else [line.sku for line in found[0].lines]
        items = await read_items(kv, wanted or [])
        decision = decide(found[0] if found else None, items)
        if decision is None:
            assert found is not None
            return found[0]
        reservation, changed = decision
        writes = [Write(f"order.{order_id}", reservation, found[1] if found else 0)]
        writes += [Write(f"sku.{item.sku}", item, items[item.sku][1]) for item in changed]
        try:
            await write_all(ctx.client, stock, writes)
        except Conflict:
            continue  # another order took the same SKUs meanwhile: decide again
        ctx.log.info("reservation changed", order_id=order_id, status=reservation.status)
        return reservation
    raise RuntimeError(f"order {order_id}: {RETRIES} conflicting writes in a row; retried later")


async def read_items(kv: Any, skus: list[str]) -> Items:
    items: Items = {}
    for sku in sorted(set(skus)):
        found = await read(kv, f"sku.{sku}", StockItem)
        if found is not None:
            items[sku] = found
    return items


def reserve(order_id: str, lines: list[StockLine]) -> Decide:
    """All lines held, or the order rejected with the SKUs that are short."""

    def decide(found: Reservation | None, items: Items) -> Decision | None:
        if found is not None:
            return None  # decided before (or voided by an earlier cancellation)
        short = [
            line.sku
            for line in lines
            if line.sku not in items or items[line.sku][0].available < line.quantity
        ]
        if short:
            return Reservation(order_id, "rejected", lines, f"out of stock: {', '.join(short)}"), []
        changed = []
        for line in lines:
            item = items[line.sku][0]
            changed.append(
                msgspec.structs.replace(
                    item,
                    available=item.available - line.quantity,
                    reserved=item.reserved + line.quantity,
                    holds={**item.holds, order_id: line.quantity},
                )
            )
        return Reservation(order_id, "reserved", lines), changed

    return decide


def release(order_id: str) -> Decide:
    """Held stock back to available; an order not reserved yet is voided instead."""

    def decide(found: Reservation | None, items: Items) -> Decision | None:
        if found is None:  # cancelled before reserved: make sure it never will be
            return Reservation(order_id, "void"), []
        if found.status != "reserved":
            return None
        return msgspec.structs.replace(found, status="released"), unhold(found, items, "available")

    return decide


def commit(order_id: str) -> Decide:
    """Held stock becomes sold."""

    def decide(found: Reservation | None, items: Items) -> Decision | None:
        if found is not None and found.status == "committed":
            return None
        if found is None or found.status != "reserved":
            status = found.status if found is not None else "unknown"
            raise Reject(f"order {order_id} was confirmed but its stock is {status}")
        return msgspec.structs.replace(found, status="committed"), unhold(found, items, "sold")

    return decide


def unhold(found: Reservation, items: Items, to: Literal["available", "sold"]) -> list[StockItem]:
    """The order's holds removed from its SKUs, the quantities moved to `to`."""
    changed = []
    for line in found.lines:
        item = items[line.sku][0]
        held = item.holds.get(found.order_id, 0)
        holds = {k: v for k, v in item.holds.items() if k != found.order_id}
        moved = {to: getattr(item, to) + held}
        changed.append(
            msgspec.structs.replace(item, reserved=item.reserved - held, holds=holds, **moved)
        )
    return changed


# --- requests ---------------------------------------------------------------------------


@service.rpc("restock")
async def restock(req: Restock, ctx: Context) -> StockItem:
    """Put more on the shelf (a new SKU needs a `name`)."""
    kv = await open_stock(ctx)
    while True:
        found = await read(kv, f"sku.{req.sku}", StockItem)
        if found is None:
            item = StockItem(req.sku, req.name or req.sku, req.quantity, received=req.quantity)
        else:
            old = found[0]
            item = msgspec.structs.replace(
                old, available=old.available + req.quantity, received=old.received + req.quantity
            )
        try:
            revision = found[1] if found else 0
            await write_all(ctx.client, stock, [Write(f"sku.{req.sku}", item, revision)])
        except Conflict:
            continue
        ctx.log.info("restocked", sku=req.sku, quantity=req.quantity, available=item.available)
        return item


@service.rpc("get")
async def get(req: GetStock, ctx: Context) -> StockItem:
    kv = await open_stock(ctx)
    found = await read(kv, f"sku.{req.sku}", StockItem)
    if found is None:
        raise NotFound(f"no sku {req.sku}")
    return found[0]


@service.rpc("list")
async def list_stock(ctx: Context) -> list[StockItem]:
    """Every SKU, by name of SKU."""
    kv = await open_stock(ctx)
    keys = await keys_matching(ctx.client, stock, "sku.*")
    items = await read_items(kv, [key.removeprefix("sku.") for key in keys])
    return [items[sku][0] for sku in sorted(items)]


if __name__ == "__main__":
    service.run()
