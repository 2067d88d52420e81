"""Retries with backoff, dead letters, and replaying them once the cause is fixed.

A handler that raises is retried after the `backoff` delay of that attempt. After
`max_deliver` attempts (or at once, for `Reject`) the event is copied to the DEADLETTER
stream with the reason, and the stream moves on: a bad event never blocks the good
ones. `replay_dead_letter` (also `mesh dlq replay ID`) publishes it again.

Run: `python examples/retries_and_dead_letters.py`.
"""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from framework import (
    Client,
    Context,
    DeadLetter,
    Reject,
    Service,
    configure_logging,
    connect,
    list_dead_letters,
    replay_dead_letter,
)


class Invoice(msgspec.Struct):
    invoice_id: str
    amount_cents: int


billing = Service("billing", publishes=["invoice.issued.v1"])
printer_online = False
printed = asyncio.Event()


@billing.subscribe("invoice.issued.v1", max_deliver=3, backoff=[0.2, 0.5])
async def print_invoice(event: Invoice, ctx: Context) -> None:
    if event.amount_cents < 0:
        raise Reject("negative amount: no retry can fix that")
    if not printer_online:
        print(f"{event.invoice_id}: attempt {ctx.attempt} failed, printer offline")
        raise ConnectionError("printer offline")
    print(f"{event.invoice_id}: printed on attempt {ctx.attempt}")
    printed.set()


async def run() -> None:
    global printer_online
    run_id = uuid.uuid4().hex[:6]
    async with billing.serve(), connect() as client:
        for invoice in (Invoice(f"inv-{run_id}-1", 500), Invoice(f"inv-{run_id}-2", -1)):
            await client.publish("invoice.issued.v1", invoice)
        async with asyncio.timeout(10):  # 3 attempts, then dead letters
            while len(mine := await dead_letters(client, run_id)) < 2:  # noqa: ASYNC110 (polls the server)
                await asyncio.sleep(0.1)
        for letter in mine:
            print(f"dead letter #{letter.id} ({letter.reason}): {letter.error}")

        printer_online = True  # the cause is fixed: replay what failed for that reason
        for letter in mine:
            if letter.reason == "max_deliver":
                await replay_dead_letter(client, letter.id)
        async with asyncio.timeout(10):
            await printed.wait()
        print("replayed dead letter handled")


async def dead_letters(client: Client, run_id: str) -> list[DeadLetter]:
    letters = await list_dead_letters(client, service="billing")
    return [letter for letter in letters if run_id in letter.data]


def main() -> None:
    configure_logging(level="CRITICAL")  # the failures above are the point; keep logs quiet
    asyncio.run(run())


if __name__ == "__main__":
    main()
