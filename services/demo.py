"""`python -m services.demo` (`just demo`): place a few orders on a running mesh.

Shows where each order ended, and one order's trace across the services.

Some orders are above the payment provider's limit and get declined, so the demo shows
both paths: pending -> confirmed (payment captured, customer notified) and
pending -> cancelled (payment declined, customer notified).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from framework import ServiceError, configure_logging, connect
from services.contracts import CreateOrder, GetOrder, Order, OrderItem

__all__ = ["main", "run_demo"]

TRACE_FILE = Path(os.environ.get("MESH_TRACE_FILE") or ".mesh/traces.jsonl")
_TRACE_IDS: dict[str, str] = {}


def _current_trace_id() -> str:
    from opentelemetry import trace

    return f"{trace.get_current_span().get_span_context().trace_id:032x}"


FINAL = ("confirmed", "cancelled", "refunded")
# (customer, sku, quantity, unit price in cents): every third one is above the limit
BASKETS = [
    ("alice", "book-dune", 2, 1_999),
    ("bob", "lamp-arc", 1, 4_500),
    ("carol", "piano-grand", 1, 2_500_000),
    ("dave", "mug-owl", 4, 850),
    ("erin", "bike-road", 1, 189_900),
    ("frank", "pen-ink", 10, 299),
]


def _order_request(n: int) -> CreateOrder:
    customer, sku, quantity, price = BASKETS[n % len(BASKETS)]
    return CreateOrder(
        customer_id=f"{customer}-{n}",
        items=[OrderItem(sku=sku, quantity=quantity, unit_price_cents=price)],
    )


async def _place(url: str | None, count: int, tracer: Any) -> list[Order]:
    async with connect(url, name="demo") as client:
        placed: list[Order] = []
        for n in range(count):
            with tracer.start_as_current_span(f"demo order {n + 1}"):
                order = await client.call(
                    "orders.create", _order_request(n), returns=Order, timeout=5
                )
                placed.append(order)
                _TRACE_IDS[order.id] = _current_trace_id()
        for order in placed:
            print(
                f"placed    {order.id}  {order.customer_id:<10} {order.total_cents / 100:>10.2f}  {order.status}"
            )
        final: dict[str, Order] = {}
        with anyio.move_on_after(30):
            while len(final) < len(placed):
                for order in placed:
                    if order.id not in final:
                        now = await client.call("orders.get", GetOrder(order.id), returns=Order)
                        if now.status in FINAL:
                            final[order.id] = now
                await anyio.sleep(0.2)
        return [final.get(order.id, order) for order in placed]


def _tracing() -> tuple[Any, Any]:
    """The demo's own spans go to the mesh's trace file, next to the services' spans."""
    from opentelemetry import trace

    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        from framework.observability.trace_file import SpanFileExporter
    except ImportError:  # no SDK: orders still flow, the trace is just not shown
        return None, trace.get_tracer("demo")
    from opentelemetry.sdk.resources import Resource

    provider = TracerProvider(resource=Resource.create({"service.name": "demo"}))
    provider.add_span_processor(SimpleSpanProcessor(SpanFileExporter(TRACE_FILE)))
    trace.set_tracer_provider(provider)  # the framework's client spans record too
    return provider, provider.get_tracer("demo")


def _show_trace(provider: Any, order: Order) -> None:
    from framework.observability.console_traces import render_trace
    from framework.observability.trace_file import read_trace

    provider.force_flush()
    time.sleep(1.0)  # the services write their spans every 200 ms
    trace_id = _TRACE_IDS.get(order.id)
    spans = read_trace(TRACE_FILE, trace_id) if trace_id else []
    if not spans:
        print(f"(no spans for {order.id} in {TRACE_FILE}: was the mesh started with `mesh up`?)")
        return
    print(f"\nthe trace of {order.id} ({order.status}) across the services:")
    print(render_trace(spans), end="")


def run_demo(url: str | None = None, *, orders: int = 6) -> int:
    configure_logging(level="WARNING")
    provider, tracer = _tracing()
    try:
        results = anyio.run(_place, url, orders, tracer, backend="asyncio")
    except (ServiceError, OSError, TimeoutError) as error:
        print(f"demo: {error} (is the mesh up? `just up` in another terminal)", file=sys.stderr)
        return 1
    except Exception as error:  # nats-py's "no servers available" and friends
        print(f"demo: cannot reach the mesh: {error!r} (`just up` first)", file=sys.stderr)
        return 1
    print()
    print(f"{'order':<26} {'customer':<10} {'total':>10}  final state")
    for order in results:
        why = f" ({order.reason})" if order.reason else ""
        print(
            f"{order.id:<26} {order.customer_id:<10} {order.total_cents / 100:>10.2f}  {order.status}{why}"
        )
    if provider is not None and results:
        _show_trace(provider, results[0])
    unfinished = [o.id for o in results if o.status not in FINAL]
    if unfinished:
        print(
            f"demo: {len(unfinished)} order(s) did not reach a final state in 30 s", file=sys.stderr
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: `python -m services.demo [--url URL] [--orders N]`."""
    parser = argparse.ArgumentParser(
        prog="python -m services.demo",
        description="Place orders on a running mesh (`just up`) and show what happened.",
    )
    parser.add_argument(
        "--url", default=None, help="NATS server URL (default: $NATS_URL, else local)"
    )
    parser.add_argument("--orders", type=int, default=6, help="how many orders (default: 6)")
    args = parser.parse_args(argv)
    return run_demo(args.url, orders=args.orders)


if __name__ == "__main__":
    sys.exit(main())
