"""A consumer service run as a subprocess by the fault tests (so they can SIGKILL it).

It handles `order.created.v1` events and leaves two ledgers in `--ledger DIR`:

- `attempts.log`: one line per handler run (the event id), written first thing, so an
  event whose handler ran twice shows up twice: that is what idempotency by event id
  cannot rule out when the process dies between the side effect and the marker.
- `effects.log`: one line per order id, written only if the order id is not in it
  yet. This is the business-key check users are told to add to handlers with external
  side effects; with it, every effect is applied exactly once even across a crash.

Writes are single `os.write` calls on O_APPEND files: no user-space buffer that a
SIGKILL could lose after the handler returned.

    python tests/side_effect_consumer.py --url nats://... --ledger DIR [--max-concurrency N]
        [--ack-wait S] [--sleep S] [--no-idempotent] [--no-effects]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import anyio
import msgspec

from framework import Context, Service


class OrderCreated(msgspec.Struct):
    order_id: str
    amount_cents: int


def build(args: argparse.Namespace) -> Service:
    ledger = Path(args.ledger)
    ledger.mkdir(parents=True, exist_ok=True)
    effects_path = ledger / "effects.log"
    applied: set[str] = set()
    if effects_path.exists() and not args.no_effects:
        applied.update(line for line in effects_path.read_text().splitlines() if line)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    attempts_fd = os.open(ledger / "attempts.log", flags, 0o644)
    effects_fd = os.open(effects_path, flags, 0o644)
    delay: float = args.sleep

    service = Service(args.service, version="1.0.0", description="side-effect ledger")

    @service.subscribe(
        "order.created.v1",
        max_concurrency=args.max_concurrency,
        ack_wait=args.ack_wait,
        idempotent=not args.no_idempotent,
        backoff=[0.2],
    )
    async def on_order_created(event: OrderCreated, ctx: Context) -> None:
        os.write(attempts_fd, f"{ctx.event_id}\n".encode())
        if args.no_effects:
            pass
        elif event.order_id not in applied:  # the business key makes the effect idempotent
            applied.add(event.order_id)
            os.write(effects_fd, f"{event.order_id}\n".encode())
        if delay:
            await anyio.sleep(delay)  # the rest of the work: other calls, I/O...

    return service


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="NATS URL(s), default NATS_URL")
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--service", default="ledger")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--ack-wait", type=float, default=2.0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--no-idempotent", action="store_true")
    parser.add_argument(
        "--no-effects", action="store_true", help="only attempts.log: no in-memory key set"
    )
    args = parser.parse_args(argv)
    build(args).run(args.url, grace=1.0)


if __name__ == "__main__":
    sys.exit(main())
