"""A plain script as a client: `connect()`, then call services and read typed results.

No service of its own, no handlers: what a cron job, a web backend or a notebook does.
The script talks to the sample shop (orders, payments, inventory, notifications); to keep the
example self-contained it starts the mesh in-process first. Against a running mesh
(`just up`) those become extra replicas that share the work.

Run: `python examples/plain_script_client.py`.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from contextlib import AsyncExitStack

from framework import ServiceError, configure_logging, connect
from services.contracts import CreateOrder, GetOrder, Order, OrderItem


async def place_order(customer: str, items: list[OrderItem]) -> None:
    async with connect() as client:  # NATS_URL, or nats://127.0.0.1:4222
        try:
            order = await client.call("orders.create", CreateOrder(customer, items), returns=Order)
        except ServiceError as error:
            print(f"rejected: {type(error).__name__} {error.code}: {error.message}")
            return
        print(f"created {order.id}: {order.total_cents} cents, {order.status}")
        async with asyncio.timeout(10):
            while order.status == "pending":
                await asyncio.sleep(0.1)
                order = await client.call("orders.get", GetOrder(order.id), returns=Order)
        print(
            f"order {order.id} is {order.status}" + (f" ({order.reason})" if order.reason else "")
        )


async def run() -> None:
    os.environ.setdefault("MESH_OUTBOX", os.path.join(tempfile.gettempdir(), "outbox.jsonl"))
    from services import inventory, notifications, orders, payments

    async with AsyncExitStack() as mesh:
        for module in (notifications, payments, inventory, orders):
            await mesh.enter_async_context(module.service.serve())
        await place_order("c-1", [OrderItem("book-dune", 2, 1500), OrderItem("pen-ink", 1, 300)])
        await place_order("c-2", [OrderItem("piano-grand", 1, 500_000)])
        await place_order("c-3", [OrderItem("book-dune", 0, 1500)])


def main() -> None:
    configure_logging(level="WARNING")
    asyncio.run(run())


if __name__ == "__main__":
    main()
