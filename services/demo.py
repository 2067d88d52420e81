"""`python -m services.demo` (`just demo`): shop at the HTTP gateway as a customer would.

Against the mesh `just up` runs, it places orders with `POST /orders` at the gateway,
prints one order's server-sent events (`GET /orders/{id}/events`) as they arrive,
follows every order to its final state and prints each one with the reason, then that
order's trace across the services (from the mesh's trace file, `MESH_TRACE_FILE`, else
`.mesh/traces.jsonl`) and where the dashboard is.

The baskets hold SKUs of the seed catalog (`services/inventory.py`), so both paths of
the saga show: confirmed (stock reserved, payment captured), and cancelled because the
payment was declined (above the provider's limit) or a SKU is sold out (the order's
other lines are not held either, and a captured payment is refunded).

The gateway is the one `--gateway` names, else `$GATEWAY_URL`, else the one the running
mesh announces (the `url` in the gateway's `$SRV.PING` metadata, the `gateway: http://...`
line of `just up`), else `GATEWAY_HOST`/`GATEWAY_PORT` as the gateway reads them
(http://127.0.0.1:8000). Exits 1 when an order is not final within `--wait` seconds or
the gateway cannot be used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
from httpx_sse import SSEError, aconnect_sse

from framework import MeshError, configure_logging, connect
from services import http as shop_http
from services.contracts import CreateOrder, Order, OrderItem

__all__ = ["BASKETS", "main", "run_demo"]

TRACE_FILE = Path(os.environ.get("MESH_TRACE_FILE") or ".mesh/traces.jsonl")
FINAL = frozenset({"confirmed", "cancelled", "refunded"})
STREAMS = 8  # orders followed at once (one open event stream each)

# (customer, lines of (SKU, quantity, unit price in cents)): SKUs of the seed catalog
BASKETS: list[tuple[str, list[tuple[str, int, int]]]] = [
    ("alice", [("book-dune", 2, 1_999)]),  # confirmed
    ("bob", [("lamp-arc", 1, 4_500)]),  # confirmed
    ("carol", [("bike-road", 1, 189_900)]),  # declined: above the provider's limit
    ("dave", [("mug-owl", 4, 850), ("pen-ink", 3, 299)]),  # confirmed
    ("erin", [("kite-red", 1, 1_500)]),  # out of stock: the kite is sold out
    ("frank", [("pen-ink", 10, 299), ("kite-red", 2, 1_500)]),  # out of stock: no pens held
]


class DemoFailed(Exception):
    """The gateway refused or broke off what the demo asked (the message says how)."""


@dataclass
class Where:
    """The URLs of the shop's HTTP processes, and where the gateway's came from."""

    gateway: str
    dashboard: str
    source: str


@dataclass
class Placed:
    """The orders placed, the trace id each started, and their final states."""

    ids: list[str] = field(default_factory=list)
    traces: dict[str, str] = field(default_factory=dict)
    finals: dict[str, Order] = field(default_factory=dict)


def order_request(n: int) -> CreateOrder:
    """The `n`-th order: the baskets in turn, each customer numbered by the order."""
    customer, lines = BASKETS[n % len(BASKETS)]
    items = [OrderItem(sku, quantity, price) for sku, quantity, price in lines]
    return CreateOrder(customer_id=f"{customer}-{n}", items=items)


# --- where the gateway is ---------------------------------------------------------------


async def announced(nats_url: str | None) -> dict[str, str]:
    """The URL each HTTP process of the mesh announces (its `$SRV.PING` metadata), by
    service name; empty when NATS cannot be reached (the defaults apply then)."""
    try:
        with anyio.fail_after(6):
            async with connect(nats_url, name="demo", connect_timeout=3) as client:
                pings = await client.ping(timeout=0.5)
    except (MeshError, OSError, TimeoutError):
        return {}
    return {p.name: p.metadata["url"] for p in pings if p.metadata and "url" in p.metadata}


def locate(flag: str | None, urls: dict[str, str]) -> Where:
    """Flag, environment, announcement, default: the first that says where the gateway is."""
    dashboard = urls.get("dashboard", shop_http.dashboard.url)
    for url, source in (
        (flag, "--gateway"),
        (os.environ.get("GATEWAY_URL"), "$GATEWAY_URL"),
        (urls.get("gateway"), "announced by the running gateway"),
    ):
        if url:
            return Where(url.rstrip("/"), dashboard, source)
    return Where(shop_http.gateway.url, dashboard, "the default of `just up`")


# --- orders over HTTP -------------------------------------------------------------------


async def place(http: httpx.AsyncClient, n: int, tracer: Any) -> tuple[str, str]:
    """`POST /orders` in a span of its own (its `traceparent` goes along, so the gateway
    continues the trace); the order id and the trace id."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    body = msgspec.to_builtins(order_request(n))
    with tracer.start_as_current_span(f"demo order {n + 1}", kind=SpanKind.CLIENT) as span:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        response = await http.post("/orders", json=body, headers=headers)
        trace_id = f"{span.get_span_context().trace_id:032x}"
    if response.status_code != 202:
        raise DemoFailed(f"POST /orders answered {response.status_code}: {response.text}")
    order_id: str = response.json()["id"]
    return order_id, trace_id


async def follow(
    http: httpx.AsyncClient, order_id: str, show: Callable[[str, str], None] | None = None
) -> Order:
    """Read the order's event stream until the gateway ends it (the order is final), each
    event to `show(event, data)` if given; then the order as `GET /orders/{id}` answers."""
    while True:
        url = f"/orders/{order_id}/events"
        async with aconnect_sse(http, "GET", url, timeout=httpx.Timeout(10, read=None)) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                raise DemoFailed(f"GET {url} answered {source.response.status_code}")
            async for event in source.aiter_sse():
                if show is not None:
                    show(event.event, event.data)
                if event.event == "end":
                    break
        order = await get_order(http, order_id)
        if order.status in FINAL:
            return order


async def get_order(http: httpx.AsyncClient, order_id: str) -> Order:
    response = await http.get(f"/orders/{order_id}")
    if response.status_code != 200:
        raise DemoFailed(f"GET /orders/{order_id} answered {response.status_code}")
    return msgspec.json.decode(response.content, type=Order)


def stream_printer() -> Callable[[str, str], None]:
    """Prints each event as its `event:` and `data:` lines, with the time since the start."""
    started = time.monotonic()

    def show(event: str, data: str) -> None:
        when = f"  +{time.monotonic() - started:5.2f}s  "
        print(f"{when}event: {event}")
        for line in data.splitlines() or [""]:
            print(f"{'':{len(when)}}data: {line}")

    return show


async def settle(http: httpx.AsyncClient, placed: Placed, wait: float) -> None:
    """Follow every order not final yet, a few at a time, for at most `wait` seconds."""
    limiter = anyio.CapacityLimiter(STREAMS)

    async def one(order_id: str) -> None:
        async with limiter:
            placed.finals[order_id] = await follow(http, order_id)

    with anyio.move_on_after(wait):
        async with anyio.create_task_group() as tasks:
            for order_id in placed.ids:
                if order_id not in placed.finals:
                    tasks.start_soon(one, order_id)


async def shop(where: Where, count: int, wait: float, tracer: Any) -> tuple[Placed, list[Order]]:
    """Place the orders, stream the first, wait for all; every order as it stands now."""
    placed = Placed()
    deadline = time.monotonic() + wait
    async with httpx.AsyncClient(base_url=where.gateway, timeout=10) as http:
        for n in range(count):
            order_id, placed.traces[order_id] = await place(http, n, tracer)
            placed.ids.append(order_id)
            if n == 0:
                print(f"\nGET /orders/{order_id}/events, as it arrives:")
                with anyio.move_on_after(wait):
                    placed.finals[order_id] = await follow(http, order_id, stream_printer())
        await settle(http, placed, max(0.0, deadline - time.monotonic()))
        orders = [placed.finals.get(i) or await get_order(http, i) for i in placed.ids]
    return placed, orders


# --- the trace --------------------------------------------------------------------------


def tracing() -> tuple[Any, Any]:
    """The demo's own spans go to the mesh's trace file, next to the services' spans."""
    from opentelemetry import trace

    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        from framework.observability.trace_file import SpanFileExporter
    except ImportError:  # no SDK: orders still flow, the trace is just not shown
        return None, trace.get_tracer("demo")
    provider = TracerProvider(resource=Resource.create({"service.name": "demo"}))
    provider.add_span_processor(SimpleSpanProcessor(SpanFileExporter(TRACE_FILE)))
    return provider, provider.get_tracer("demo")


async def collected(trace_id: str, settle_for: float = 1.0, at_most: float = 15.0) -> list[Any]:
    """The trace's spans once the file stops growing for `settle_for` seconds (services
    write their spans in batches, and the receipt job finishes after the order)."""
    from framework.observability.trace_file import read_trace

    spans: list[Any] = []
    with anyio.move_on_after(at_most):
        while True:
            await anyio.sleep(settle_for)
            now = await anyio.to_thread.run_sync(read_trace, TRACE_FILE, trace_id)
            if spans and len(now) == len(spans):
                break
            spans = now
    return spans


def show_trace(provider: Any, order: Order, trace_id: str) -> None:
    from framework.observability.console_traces import render_trace

    provider.force_flush()
    spans = anyio.run(collected, trace_id, backend="asyncio") if TRACE_FILE.exists() else []
    if not spans:
        print(f"\n(no spans of {order.id} in {TRACE_FILE}: was the mesh started with `just up`?)")
        return
    print(f"\nthe trace of {order.id} ({order.status}) across the services:")
    print(render_trace(spans), end="")


# --- the command ------------------------------------------------------------------------


def report(orders: list[Order]) -> None:
    print(f"\n{'order':<26} {'customer':<10} {'total':>10}  final state (reason)")
    for order in orders:
        why = f" ({order.reason})" if order.reason else ""
        total = order.total_cents / 100
        print(f"{order.id:<26} {order.customer_id:<10} {total:>10.2f}  {order.status}{why}")


def run_demo(
    url: str | None = None, *, gateway: str | None = None, orders: int = 6, wait: float = 45.0
) -> int:
    """Place `orders` orders at the gateway and show what became of them; the exit code.

    `url`: NATS, to find the gateway and dashboard the mesh announces (default
    `NATS_URL`); `gateway`: the gateway's URL (default: see the module's docstring);
    `wait`: seconds every order gets to become final.
    """
    configure_logging(level="ERROR")
    where = locate(gateway, anyio.run(announced, url, backend="asyncio"))
    print(f"shop gateway: {where.gateway} ({where.source})")
    provider, tracer = tracing()
    try:
        placed, results = anyio.run(shop, where, orders, wait, tracer, backend="asyncio")
    except (httpx.HTTPError, SSEError, DemoFailed) as error:
        why = f"{type(error).__name__}: {error}"
        print(f"demo: {where.gateway}: {why} (is the mesh up? `just up`)", file=sys.stderr)
        return 1
    report(results)
    if provider is not None and results:
        show_trace(provider, results[0], placed.traces[results[0].id])
    print(f"\ndashboard: {where.dashboard}")
    unfinished = [order.id for order in results if order.status not in FINAL]
    if unfinished:
        print(f"demo: {len(unfinished)} order(s) not final after {wait:g} s", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m services.demo [--gateway URL] [--url NATS_URL] [--orders N] [--wait S]`."""
    parser = argparse.ArgumentParser(
        prog="python -m services.demo",
        description="Place orders at the shop's HTTP gateway (`just up`) and show what happened.",
    )
    parser.add_argument(
        "--gateway",
        default=None,
        help="the gateway's URL (default: $GATEWAY_URL, else what the mesh announces, "
        "else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--url", default=None, help="NATS URL, to ask the mesh where the gateway is ($NATS_URL)"
    )
    parser.add_argument("--orders", type=int, default=len(BASKETS), help="how many orders")
    parser.add_argument(
        "--wait", type=float, default=45.0, help="seconds the orders get to be final (45)"
    )
    args = parser.parse_args(argv)
    return run_demo(args.url, gateway=args.gateway, orders=args.orders, wait=args.wait)


if __name__ == "__main__":
    sys.exit(main())
