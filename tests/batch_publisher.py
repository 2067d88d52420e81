"""A publisher process for the fault tests (so they can SIGKILL it mid-batch).

Publishes `order.created.v1` events e-<i> (order o-<i>) for i in [--start, --total) with
a `BatchPublisher`, writing one line per acknowledged event id to `--acked` (single
`os.write` calls on an O_APPEND file, so a SIGKILL loses no line it wrote). Started
again with the same range, it publishes the same ids: the stream stores each once.

    python tests/batch_publisher.py --url nats://... --acked FILE [--total N] [--pace S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import msgspec

from framework import BatchPublisher, connect


class OrderCreated(msgspec.Struct):
    order_id: str
    amount_cents: int


async def publish(args: argparse.Namespace) -> None:
    fd = os.open(args.acked, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    async with connect(args.url) as client:
        for start in range(0, args.total, args.batch):
            async with BatchPublisher(client, max_outstanding=args.batch) as publisher:
                for i in range(start, min(start + args.batch, args.total)):
                    await publisher.publish(
                        "order.created.v1", OrderCreated(f"o-{i}", i), event_id=f"e-{i}"
                    )
                    if i == start + args.batch // 2:  # most of the time is spent mid-batch
                        await asyncio.sleep(args.pace)
            os.write(fd, "".join(f"{a.event_id}\n" for a in publisher.acks).encode())
    os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--acked", required=True, help="file of acknowledged event ids")
    parser.add_argument("--total", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--pace", type=float, default=0.01, help="seconds paused mid-batch")
    asyncio.run(publish(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
