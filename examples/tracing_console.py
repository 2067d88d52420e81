"""Tracing: one request through three services shows as one trace and one correlation id.

`ctx.call` and `ctx.publish` carry the correlation id and the W3C trace context onward,
so nothing here passes them by hand. With `MESH_TRACE_CONSOLE=1` (set below unless you
set it) and the OpenTelemetry SDK installed, `configure_telemetry()` prints each finished
trace as a tree on stderr; without them the example still runs and shows the
correlation ids, which every log line carries too.

Run: `python examples/tracing_console.py`.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import msgspec
from opentelemetry import trace

from framework import Context, Service, configure_logging, configure_telemetry, connect


class Checkout(msgspec.Struct):
    sku: str


class CheckedOut(msgspec.Struct):
    sku: str


shop = Service("shop", publishes=["shop.checked_out.v1"])
stock = Service("stock")
mailer = Service("mailer")
seen: dict[str, tuple[str, str]] = {}  # handler -> (correlation id, trace id)
all_handled = asyncio.Event()


def note(ctx: Context) -> None:
    handler = f"{ctx.service}.{ctx.handler}"
    trace_id = format(ctx.span.get_span_context().trace_id, "032x")
    seen[handler] = (ctx.correlation_id, trace_id)
    print(f"{handler:<20} correlation={ctx.correlation_id} trace={trace_id}")
    if len(seen) == 3:
        all_handled.set()


@shop.rpc("checkout")
async def checkout(req: Checkout, ctx: Context) -> str:
    note(ctx)
    await ctx.call("stock.reserve", req, returns=bool)
    await ctx.publish("shop.checked_out.v1", CheckedOut(req.sku))
    return "ok"


@stock.rpc("reserve")
async def reserve(req: Checkout, ctx: Context) -> bool:
    note(ctx)
    return True


@mailer.subscribe("shop.checked_out.v1")
async def send_receipt(event: CheckedOut, ctx: Context) -> None:
    note(ctx)


async def run() -> None:
    async with shop.serve(), stock.serve(), mailer.serve(), connect() as client:
        correlation_id = f"demo-{uuid.uuid4().hex[:8]}"
        await client.call("shop.checkout", Checkout("sku-1"), correlation_id=correlation_id)
        async with asyncio.timeout(10):
            await all_handled.wait()
    correlations = {c for c, _ in seen.values()}
    traces = {t for _, t in seen.values()}
    print(f"one correlation id across {len(seen)} handlers: {correlations == {correlation_id}}")
    if len(traces) == 1 and "0" * 32 not in traces:
        print(f"one trace across {len(seen)} handlers: {traces.pop()}")


def main() -> None:
    configure_logging(level="WARNING")
    os.environ.setdefault("MESH_TRACE_CONSOLE", "1")
    if not configure_telemetry("tracing-example"):
        print("tracing skipped (no OpenTelemetry SDK); ids still flow")
    asyncio.run(run())
    provider = trace.get_tracer_provider()
    getattr(provider, "force_flush", lambda: None)()  # print the last spans before exiting


if __name__ == "__main__":
    main()
