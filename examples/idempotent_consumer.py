"""Idempotent consumers: an event published twice is handled once.

Two layers make a duplicate harmless, both keyed by the event id (`event_id=`, here
derived from the business key, so a retrying producer sends the same id):

1. JetStream's dedupe window: a second publish with the same id within it is not
   stored at all (`ack.duplicate` is True). This example shortens the window to 1 s
   with a `Stream` declaration, to show what happens after it, too.
2. The consumer's processed-ids bucket: a duplicate stored after the window is
   acknowledged without running the handler again (`idempotent=True`, the default).

Run: `python examples/idempotent_consumer.py`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec

from framework import Context, Service, Stream, configure_logging, connect


class PointsAwarded(msgspec.Struct):
    customer_id: str
    points: int


loyalty = Service(
    "loyalty",
    description="Keeps loyalty balances",
    streams=[Stream("EVENTS_POINTS", ["events.points.>"], duplicate_window=1.0)],
)
balance: dict[str, int] = {}


@loyalty.subscribe("points.awarded.v1")
async def add_points(event: PointsAwarded, ctx: Context) -> None:
    balance[event.customer_id] = balance.get(event.customer_id, 0) + event.points
    print(f"handled {ctx.event_id}: balance {balance[event.customer_id]}")


async def run() -> None:
    purchase = f"purchase-{uuid.uuid4().hex[:8]}"  # the business key
    event = PointsAwarded("c-7", 50)
    async with loyalty.serve(), connect() as client:
        for label in ("first publish", "retry at once", "retry after the window"):
            if label == "retry after the window":
                await asyncio.sleep(1.5)
            ack = await client.publish("points.awarded.v1", event, event_id=purchase)
            print(f"{label}: stored as #{ack.seq}, duplicate={ack.duplicate}")
        async with asyncio.timeout(10):  # until the stored duplicate is delivered and skipped
            while not await skipped(client):  # noqa: ASYNC110 (polls the server)
                await asyncio.sleep(0.1)
        print(f"duplicate skipped; balance {balance['c-7']} (awarded once)")


async def skipped(client: Any) -> int:
    [stats] = await client.stats("loyalty")
    return int((stats.endpoints[0].data or {}).get("duplicates", 0))


def main() -> None:
    configure_logging(level="WARNING")
    asyncio.run(run())


if __name__ == "__main__":
    main()
