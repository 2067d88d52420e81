"""The shop's HTTP edge: orders and reports over HTTP, their progress over server-sent events.

    POST /orders                  the body of `orders.create`; 202 with the id and URLs
    GET  /orders/{id}             the order as `orders.get` answers it
    GET  /orders/{id}/events      the order, then every event about it, until it is final
    POST /reports                 enqueue a `reports.render` job; 202 with the id and URLs
    GET  /jobs/{kind}/{id}        a job's status
    GET  /jobs/{kind}/{id}/events the job's statuses (progress) until it is final
    GET  /                        a small page that places an order and shows its stream

Errors of the mesh become HTTP statuses (400 -> 422 with the message, 404 -> 404,
408 -> 504, 503 -> 503); `X-Request-Id` is the correlation id of everything a request
causes, and a `traceparent` continues into the services (see `framework.web.MeshEdge`).

Run it with `python -m services.gateway` (`GATEWAY_HOST`, `GATEWAY_PORT`, default
127.0.0.1:8000; `NATS_URL` and credentials as for every service).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Response
from fastapi.responses import HTMLResponse

from framework.web import (
    EventSourceResponse,
    MeshEdge,
    MeshEvent,
    ServerSentEvent,
    job_events,
    sse,
)
from services.contracts import ORDER_CANCELLED, ORDER_CONFIRMED

REPORT_KIND = os.environ.get("GATEWAY_REPORT_KIND", "reports.render")
FINAL_STATUSES = frozenset({"confirmed", "cancelled", "refunded"})
FINAL_EVENTS = frozenset({ORDER_CONFIRMED, ORDER_CANCELLED})
# Ids are path segments and mesh keys: the same rule the contracts apply to them.
Id = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
JobId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@+=-]+$")]
Kind = Annotated[
    str, Path(min_length=3, max_length=128, pattern=r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
]

edge = MeshEdge(name="gateway")
app = FastAPI(
    title="shop gateway",
    description="The HTTP edge of the sample shop",
    version="1.0.0",
    lifespan=edge.lifespan,
)
edge.install(app)


@app.post("/orders", status_code=202)
async def place_order(
    response: Response, order: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Create the order (validated by the orders service) and say where to follow it."""
    created = await edge.call("orders.create", order)
    order_id = created["id"]
    response.headers["Location"] = f"/orders/{order_id}"
    return {
        "id": order_id,
        "status": created["status"],
        "status_url": f"/orders/{order_id}",
        "events_url": f"/orders/{order_id}/events",
    }


@app.get("/orders/{order_id}")
async def get_order(order_id: Id) -> Any:
    """The order as `orders.get` answers it (404 when there is none)."""
    return await edge.call("orders.get", {"order_id": order_id})


@app.get("/orders/{order_id}/events")
async def order_events(order_id: Id) -> EventSourceResponse:
    """`event: order` (the order now), then each event about it, then `event: end`."""
    await edge.call("orders.get", {"order_id": order_id})  # 404 before the stream starts
    return sse(_order_stream(order_id))


async def _order_stream(order_id: str) -> AsyncIterator[ServerSentEvent | MeshEvent]:
    def about_this_order(event: MeshEvent) -> bool:
        return isinstance(event.data, dict) and event.data.get("order_id") == order_id

    # Watch first, then read the order: a change between the two is in the watch.
    watch = edge.events(">", where=about_this_order, until=lambda e: e.type in FINAL_EVENTS)
    async with watch as events:
        order = await edge.call("orders.get", {"order_id": order_id})
        yield ServerSentEvent(data=_json(order), event="order", id=f"{order_id}-now")
        if order.get("status") in FINAL_STATUSES:
            return
        async for event in events:
            yield event


@app.post("/reports", status_code=202)
async def request_report(
    response: Response, request: Annotated[dict[str, Any], Body()]
) -> dict[str, Any]:
    """Enqueue a report job; its progress streams from `events_url`."""
    handle = await edge.enqueue(REPORT_KIND, request)
    response.headers["Location"] = f"/jobs/{REPORT_KIND}/{handle.id}"
    return {
        "kind": REPORT_KIND,
        "id": handle.id,
        "status_url": f"/jobs/{REPORT_KIND}/{handle.id}",
        "events_url": f"/jobs/{REPORT_KIND}/{handle.id}/events",
    }


@app.get("/jobs/{kind}/{job_id}")
async def get_job(kind: Kind, job_id: JobId) -> Any:
    """A job's status now (404 when there is none)."""
    return _plain(await edge.job(kind, job_id).status())


@app.get("/jobs/{kind}/{job_id}/events")
async def job_status_events(kind: Kind, job_id: JobId) -> EventSourceResponse:
    """`event: status` for every change (progress included) until final, then `end`."""
    handle = edge.job(kind, job_id)
    await handle.status()  # 404 for a job that does not exist, before the stream starts
    return sse(job_events(handle))


@app.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> str:
    """A page that places an order and shows its event stream."""
    return _PAGE


def _json(value: Any) -> str:
    import msgspec

    return msgspec.json.encode(value).decode()


def _plain(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shop gateway</title>
<style>body{font:15px system-ui,sans-serif;margin:2rem;max-width:48rem}
li{font-family:ui-monospace,monospace}label{display:block;margin:.4rem 0}</style></head>
<body><h1>Place an order</h1>
<form id="order"><label>Customer <input name="customer_id" value="alice" required></label>
<label>SKU <input name="sku" value="book-dune" required></label>
<label>Quantity <input name="quantity" type="number" value="1" min="1"></label>
<label>Unit price (cents) <input name="price" type="number" value="1999" min="0"></label>
<button>Place order</button></form>
<p id="result" role="status"></p><ol id="events" aria-live="polite"></ol>
<script>
const form = document.getElementById("order"), list = document.getElementById("events");
const result = document.getElementById("result");
function show(text) { const li = document.createElement("li"); li.textContent = text; list.append(li); }
form.addEventListener("submit", async (ev) => {
  ev.preventDefault(); list.replaceChildren();
  const f = new FormData(form);
  const body = {customer_id: f.get("customer_id"), items: [{sku: f.get("sku"),
    quantity: Number(f.get("quantity")), unit_price_cents: Number(f.get("price"))}]};
  const reply = await fetch("/orders", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify(body)});
  const data = await reply.json();
  if (!reply.ok) { result.textContent = `error ${reply.status}: ${data.error.message}`; return; }
  result.textContent = `order ${data.id}`;
  const stream = new EventSource(data.events_url);
  stream.addEventListener("order", (e) => {
    const status = JSON.parse(e.data).status;
    show(status === "pending" ? "order created (pending)" : `order ${status}`);
  });
  stream.addEventListener("end", () => { stream.close(); show("end"); });
  stream.onmessage = (e) => show(e.data);
  for (const type of ["order.created.v1", "order.confirmed.v1", "order.cancelled.v1",
      "payment.captured.v1", "payment.failed.v1"])
    stream.addEventListener(type, () => show(type));
});
</script></body></html>
"""


def main() -> None:
    """`python -m services.gateway`: serve on GATEWAY_HOST:GATEWAY_PORT (loopback by default)."""
    import uvicorn

    from framework import configure_logging

    configure_logging()
    host = os.environ.get("GATEWAY_HOST", "127.0.0.1")
    port = int(os.environ.get("GATEWAY_PORT", "8000"))
    print(f"gateway: http://{host}:{port} (NATS at {os.environ.get('NATS_URL', 'default')})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
