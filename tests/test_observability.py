"""Traces, correlation ids, logs and metrics across real services on a real server.

The OpenTelemetry SDK (a dev dependency) is installed once for this module: the global
TracerProvider and MeterProvider can be set only once per process. Spans go to an
in-memory exporter cleared before each test; metrics are read from an in-memory
reader, with service names unique to each test since counters are process-wide.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.otel import recorded_spans, sdk_provider

from framework import Context, NotFound, Reject, Service, ServiceError, configure_logging
from framework.observability.console_traces import TraceTreePrinter
from framework.observability.logging import REDACTED, add_trace_ids
from framework.testing import eventually

ROOT = Path(__file__).resolve().parent.parent


class Order(msgspec.Struct):
    order_id: str
    card: str = ""


class OrderCreated(msgspec.Struct):
    order_id: str


class Receipt(msgspec.Struct):
    order_id: str
    status: str


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader | None
    printer: TraceTreePrinter

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="module")
def otel() -> Iterator[Otel]:
    with recorded_spans() as exporter:  # later modules' spans are dropped, not kept in memory
        printer = TraceTreePrinter(stream=io.StringIO())
        sdk_provider().add_span_processor(printer)
        reader: InMemoryMetricReader | None = None
        if not isinstance(otel_metrics.get_meter_provider(), MeterProvider):
            reader = InMemoryMetricReader()
            otel_metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        yield Otel(exporter, reader, printer)
    printer.stream = io.StringIO()


@pytest.fixture
def sdk(otel: Otel) -> Otel:
    otel.exporter.clear()
    otel.printer.stream = io.StringIO()
    return otel


_unique = itertools.count(1)


def unique(name: str) -> str:
    return f"{name}{next(_unique)}"


def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = by_name(spans, name)
    return span


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """Trace and span id as log lines carry them."""
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


# -- one trace across three services -------------------------------------------------


async def test_one_trace_across_three_services_with_conventions_and_logs(serve, client, sdk):
    orders, payments, ledger = Service("orders"), Service("payments"), Service("ledger")
    current: dict[str, tuple[Any, Any]] = {}

    @orders.rpc("create")
    async def create(req: Order, ctx: Context) -> Receipt:
        current["rpc"] = (trace.get_current_span(), ctx.span)
        ctx.log.info("order received")
        await ctx.publish("order.created.v1", OrderCreated(req.order_id))
        return Receipt(req.order_id, "pending")

    @payments.subscribe("order.created.v1", backoff=[0.05])
    async def on_created(event: OrderCreated, ctx: Context) -> None:
        current["event"] = (trace.get_current_span(), ctx.span)
        ctx.log.info("charging")
        await ctx.call("ledger.record", Order(event.order_id), returns=Receipt)

    @ledger.rpc("record")
    async def record(req: Order, ctx: Context) -> Receipt:
        ctx.log.info("recorded")
        return Receipt(req.order_id, "recorded")

    await serve(ledger)
    await serve(payments)  # creates the ORDER stream
    await serve(orders)
    with structlog.testing.capture_logs() as logs:
        receipt = await client.call("orders.create", Order("o-1"), returns=Receipt)
        assert receipt.status == "pending"
        await eventually(lambda: by_name(sdk.spans(), "process ledger.record"))
        await eventually(lambda: by_name(sdk.spans(), "process events.order.created.v1"))

    spans = sdk.spans()
    chain = [
        ("request orders.create", SpanKind.CLIENT),
        ("process orders.create", SpanKind.SERVER),
        ("publish events.order.created.v1", SpanKind.PRODUCER),
        ("process events.order.created.v1", SpanKind.CONSUMER),
        ("request ledger.record", SpanKind.CLIENT),
        ("process ledger.record", SpanKind.SERVER),
    ]
    assert sorted(s.name for s in spans) == sorted(name for name, _ in chain)
    ordered = [one(spans, name) for name, _ in chain]
    assert [s.kind for s in ordered] == [kind for _, kind in chain]
    assert len({s.context.trace_id for s in ordered}) == 1
    assert ordered[0].parent is None
    for parent, child in itertools.pairwise(ordered):
        assert child.parent is not None and child.parent.span_id == parent.context.span_id
    client_call, server, producer, consumer, _, handled = ordered
    assert [link.context.span_id for link in consumer.links] == [producer.context.span_id]

    for span in ordered:
        attributes = span.attributes or {}
        assert attributes["messaging.system"] == "nats"
        destination = attributes["messaging.destination.name"]
        assert "_INBOX" not in str(destination)
        assert span.name == f"{attributes['messaging.operation.name']} {destination}"
        assert span.status.status_code is StatusCode.UNSET
    expected_types = ["send", "process", "send", "process", "send", "process"]
    assert [s.attributes["messaging.operation.type"] for s in ordered] == expected_types
    assert server.attributes["messaging.consumer.group.name"] == "orders"
    assert consumer.attributes["messaging.consumer.group.name"] == "payments_on_created"
    assert handled.attributes["messaging.consumer.group.name"] == "ledger"
    assert (
        producer.attributes["messaging.message.id"] == consumer.attributes["messaging.message.id"]
    )
    assert consumer.attributes["messaging.nats.message.delivery_attempt"] == 1
    assert [s.attributes.get("mesh.service") for s in ordered[1:]] == [
        "orders",
        "orders",
        "payments",
        "payments",
        "ledger",
    ]

    # the handler's span is the current span, for RPC and event handlers alike
    for active, own in current.values():
        assert active is own and active.get_span_context().is_valid

    # one correlation id, created at the edge, on every span after it and in every line
    lines = [line for line in logs if line.get("handler")]
    assert [line["event"] for line in lines] == ["order received", "charging", "recorded"]
    (correlation_id,) = {line["correlation_id"] for line in lines}
    (trace_id,) = {line["trace_id"] for line in lines}
    assert trace_id == format(client_call.context.trace_id, "032x")
    for span in ordered[1:]:
        assert span.attributes["messaging.message.conversation_id"] == correlation_id
    for line, span in zip(lines, (server, consumer, handled), strict=True):
        assert line["span_id"] == format(span.context.span_id, "016x")
        assert {"service", "handler", "subject", "attempt"} <= line.keys()
    assert lines[1]["event_id"] == consumer.attributes["messaging.message.id"]


async def test_user_spans_and_plain_client_calls_nest_under_the_handler(serve, client, sdk):
    front, back = Service("front"), Service("back")
    tracer = trace.get_tracer("test")

    @front.rpc("go")
    async def go(req: Order, ctx: Context) -> Receipt:
        with tracer.start_as_current_span("validate"):
            # the client, not ctx.call: the current span still makes it a child
            return await ctx.client.call("back.store", req, returns=Receipt)

    @front.subscribe("order.created.v1", backoff=[0.05])
    async def on_created(event: OrderCreated, ctx: Context) -> None:
        with tracer.start_as_current_span("score"):
            await ctx.call("back.store", Order(event.order_id), returns=Receipt)

    @back.rpc("store")
    async def store(req: Order) -> Receipt:
        return Receipt(req.order_id, "stored")

    await serve(back)
    await serve(front)
    await client.call("front.go", Order("o-2"), returns=Receipt)
    await client.publish("order.created.v1", OrderCreated("o-3"))

    def finished() -> list[ReadableSpan] | None:
        spans = sdk.spans()
        return spans if len(by_name(spans, "process back.store")) == 2 else None

    spans = await eventually(finished)
    ids = {s.context.span_id: s for s in spans}

    def ancestry(span: ReadableSpan) -> list[str]:
        names = []
        while span.parent is not None and span.parent.span_id in ids:
            span = ids[span.parent.span_id]
            names.append(span.name)
        return names

    stores = sorted(by_name(spans, "request back.store"), key=lambda s: s.start_time or 0)
    assert ancestry(stores[0]) == ["validate", "process front.go", "request front.go"]
    assert ancestry(stores[1]) == [
        "score",
        "process events.order.created.v1",
        "publish events.order.created.v1",
    ]


async def test_batched_publishes_are_producer_spans_the_consumers_continue(serve, client, sdk):
    svc = Service(unique("batchtrace"))
    tracer = trace.get_tracer("test")

    @svc.subscribe("order.created.v1", backoff=[0.05])
    async def on_created(event: OrderCreated) -> None:
        pass

    await serve(svc)
    with tracer.start_as_current_span("import"):
        async with client.batch() as batch:
            for n in range(3):
                await batch.publish("order.created.v1", OrderCreated(f"o-{n}"))

    def finished() -> list[ReadableSpan] | None:
        spans = sdk.spans()
        return spans if len(by_name(spans, "process events.order.created.v1")) == 3 else None

    spans = await eventually(finished)
    (root,) = by_name(spans, "import")
    producers = by_name(spans, "publish events.order.created.v1")
    assert len(producers) == 3
    for producer in producers:
        assert producer.kind is SpanKind.PRODUCER
        assert producer.parent is not None and producer.parent.span_id == root.context.span_id
        assert producer.status.status_code is not StatusCode.ERROR
    producer_ids = {p.context.span_id for p in producers}
    for consumer in by_name(spans, "process events.order.created.v1"):
        assert consumer.parent is not None and consumer.parent.span_id in producer_ids
        assert consumer.context.trace_id == root.context.trace_id


async def test_correlation_id_is_carried_through_calls_and_events_from_handlers(serve, client):
    svc = Service(unique("relay"))
    seen: list[tuple[str, str, str | None]] = []

    @svc.rpc("start")
    async def start(req: Order, ctx: Context) -> Receipt:
        await ctx.publish("order.created.v1", OrderCreated(req.order_id))
        return Receipt(req.order_id, "ok")

    @svc.subscribe("order.created.v1", backoff=[0.05])
    async def first(event: OrderCreated, ctx: Context) -> None:
        seen.append(("first", ctx.correlation_id, ctx.causation_id))
        await ctx.publish("order.paid.v1", OrderCreated(event.order_id))

    @svc.subscribe("order.paid.v1", backoff=[0.05])
    async def second(event: OrderCreated, ctx: Context) -> None:
        seen.append(("second", ctx.correlation_id, ctx.causation_id))

    await serve(svc)
    await client.call(f"{svc.name}.start", Order("o-4"), correlation_id="order-42")
    await eventually(lambda: len(seen) == 2)
    assert [(name, cid) for name, cid, _ in seen] == [
        ("first", "order-42"),
        ("second", "order-42"),
    ]
    assert seen[1][2] is not None  # caused by the first event


# -- errors and redelivery -----------------------------------------------------------


async def test_errors_set_error_status_and_payloads_stay_out_of_logs(serve, client, sdk):
    svc = Service("fails")

    @svc.rpc("crash")
    async def crash(req: Order) -> Receipt:
        raise RuntimeError("database on fire")

    @svc.rpc("missing")
    async def missing(req: Order) -> Receipt:
        raise NotFound(f"no order {req.order_id}")

    await serve(svc)
    with structlog.testing.capture_logs(processors=[add_trace_ids]) as logs:
        with pytest.raises(ServiceError) as crashed:
            await client.call("fails.crash", Order("o-5", card="4111-1111-SECRET"))
        assert crashed.value.code == 500
        with pytest.raises(NotFound):
            await client.call("fails.missing", Order("o-6"))

    spans = sdk.spans()
    server = one(spans, "process fails.crash")
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "RuntimeError"
    assert any(event.name == "exception" for event in server.events)
    assert one(spans, "request fails.crash").status.status_code is StatusCode.ERROR
    # a 404 is the caller's error: on the client span, not the server's status
    not_found = one(spans, "process fails.missing")
    assert not_found.status.status_code is StatusCode.UNSET
    assert not_found.attributes["error.type"] == "NotFound"
    assert one(spans, "request fails.missing").status.status_code is StatusCode.ERROR

    (failure,) = [line for line in logs if line["event"] == "handler failed"]
    assert (failure["trace_id"], failure["span_id"]) == hex_ids(server)
    assert "4111-1111-SECRET" not in repr(logs)


async def test_redelivered_event_is_two_process_spans_linked_to_one_producer(serve, client, sdk):
    svc = Service(unique("flaky"))
    attempts: list[int] = []

    @svc.subscribe("order.created.v1", backoff=[0.05], max_deliver=3)
    async def flaky(event: OrderCreated, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("provider down")

    await serve(svc)
    await client.publish("order.created.v1", OrderCreated("o-7"))
    name = "process events.order.created.v1"
    await eventually(lambda: len(by_name(sdk.spans(), name)) == 2)
    spans = sdk.spans()
    producer = one(spans, "publish events.order.created.v1")
    first, second = sorted(by_name(spans, name), key=lambda s: s.start_time or 0)
    assert attempts == [1, 2]
    assert first.context.span_id != second.context.span_id
    for span, attempt in ((first, 1), (second, 2)):
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == producer.context.trace_id
        assert span.parent is not None and span.parent.span_id == producer.context.span_id
        assert [link.context.span_id for link in span.links] == [producer.context.span_id]
        assert span.attributes["messaging.nats.message.delivery_attempt"] == attempt
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == "ConnectionError"
    assert second.status.status_code is StatusCode.UNSET


# -- metrics -------------------------------------------------------------------------


def read_metrics(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    found: dict[str, list[Any]] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def point(found: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    matches = [p for p in found.get(name, []) if attributes.items() <= dict(p.attributes).items()]
    assert len(matches) == 1, (name, attributes, found.get(name))
    return matches[0]


async def test_metrics_for_an_endpoint_and_a_subscriber(serve, client, sdk):
    if sdk.reader is None:
        pytest.skip("another module installed the MeterProvider first")
    svc = Service(unique("metered"))

    @svc.rpc("echo")
    async def echo(req: Order) -> Order:
        if req.order_id == "bad":
            raise RuntimeError("bad order")
        return req

    @svc.subscribe("order.created.v1", backoff=[0.05], max_deliver=1)
    async def consume(event: OrderCreated) -> None:
        if event.order_id == "poison":
            raise ValueError("cannot handle")

    await serve(svc)
    for order_id in ("a", "b", "c", "bad"):
        with pytest.raises(ServiceError) if order_id == "bad" else contextlib.nullcontext():
            await client.call(f"{svc.name}.echo", Order(order_id))
    for order_id in ("a", "b", "poison"):
        await client.publish("order.created.v1", OrderCreated(order_id))

    rpc = {"service": svc.name, "handler": "echo", "kind": "rpc"}
    sub = {"service": svc.name, "handler": "consume", "kind": "subscriber"}

    def settled() -> dict[str, list[Any]] | None:
        found = read_metrics(sdk.reader)  # type: ignore[arg-type]
        dead = [p for p in found.get("mesh.subscriber.dead_lettered", []) if p.value == 1]
        return found if dead and point(found, "mesh.handler.handled", **sub).value == 3 else None

    found = await eventually(settled)
    assert point(found, "mesh.handler.handled", **rpc).value == 4
    assert point(found, "mesh.handler.failed", **rpc).value == 1
    assert point(found, "mesh.handler.duration", **rpc).count == 4
    assert point(found, "mesh.handler.in_flight", **rpc).value == 0
    assert point(found, "mesh.handler.handled", **sub).value == 3
    assert point(found, "mesh.handler.failed", **sub).value == 1
    assert point(found, "mesh.handler.duration", **sub).count == 3
    assert point(found, "mesh.subscriber.dead_lettered", **sub).value == 1
    assert point(found, "mesh.subscriber.lag", **sub).value == 0  # all delivered
    duration = point(found, "mesh.handler.duration", **rpc)
    assert 0 < duration.sum < 4  # seconds


# -- console trees -------------------------------------------------------------------


async def test_console_printer_prints_an_indented_tree(serve, client, sdk):
    edge, inner = Service("edge"), Service("inner")

    @edge.rpc("get")
    async def get(req: Order, ctx: Context) -> Receipt:
        with pytest.raises(NotFound):
            await ctx.call("inner.lookup", Order("missing"), returns=Receipt)
        return await ctx.call("inner.lookup", req, returns=Receipt)

    @inner.rpc("lookup")
    async def lookup(req: Order) -> Receipt:
        if req.order_id == "missing":
            raise NotFound("no such order")
        return Receipt(req.order_id, "found")

    await serve(inner)
    await serve(edge)
    await client.call("edge.get", Order("o-8"), returns=Receipt)
    stream = sdk.printer.stream
    assert isinstance(stream, io.StringIO)
    text = await eventually(lambda: stream.getvalue())
    lines = text.splitlines()
    assert lines[0].startswith("trace ") and "(6 spans" in lines[0]
    rows = lines[1:]
    assert rows[0].lstrip().startswith("request edge.get")
    assert "CLIENT" in rows[0] and rows[0].rstrip().endswith("ms")
    assert rows[1].lstrip().startswith("└─ process edge.get")
    assert "SERVER" in rows[1] and " edge " in rows[1]
    depth = [len(row) - len(row.lstrip(" │├└─")) for row in rows]
    assert depth[0] < depth[1] < depth[2]
    errors = [row for row in rows if "✗" in row]
    assert len(errors) == 1 and "request inner.lookup" in errors[0] and "404" in errors[0]
    assert sum("process inner.lookup" in row for row in rows) == 2


def run_script(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MESH_"))}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**environment, "PYTHONIOENCODING": "utf-8", **env},
        check=False,
    )


GREETER = """
    import asyncio, os
    from framework import Service, connect
    from framework import configure_telemetry

    print("installed:", configure_telemetry("greeter"))
    svc = Service("greeter")

    @svc.rpc("hello")
    async def hello(name: str) -> str:
        return "hello " + name

    async def main():
        async with connect(os.environ["NATS_URL"], name="script") as client:
            async with svc.serve(client):
                print(await client.call("greeter.hello", "world", returns=str))

    asyncio.run(main())
"""


def test_configure_telemetry_prints_trees_with_mesh_trace_console(nats_url):
    done = run_script(GREETER, {"MESH_TRACE_CONSOLE": "1", "NATS_URL": nats_url})
    assert done.returncode == 0, done.stderr
    assert "installed: True" in done.stdout and "hello world" in done.stdout
    tree = [line for line in done.stderr.splitlines() if "greeter.hello" in line]
    assert tree[0].lstrip().startswith("request greeter.hello") and "CLIENT" in tree[0]
    assert tree[1].lstrip().startswith("└─ process greeter.hello") and "greeter" in tree[1]
    assert "trace " in done.stderr


def test_configure_telemetry_without_the_sdk_warns_and_carries_on(nats_url):
    code = "import sys; sys.modules['opentelemetry.sdk'] = None\n" + textwrap.dedent(GREETER)
    done = run_script(code, {"MESH_TRACE_CONSOLE": "1", "NATS_URL": nats_url})
    assert done.returncode == 0, done.stderr
    assert "installed: False" in done.stdout and "hello world" in done.stdout
    assert "opentelemetry-sdk is not installed" in done.stdout + done.stderr


PROBE = """
    import asyncio, os, sys
    import nats
    from framework import connect

    if os.environ.get("WITH_SDK"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())

    async def main():
        nc = await nats.connect(os.environ["NATS_URL"])
        seen = []

        async def answer(msg):
            seen.append(msg.headers or {})
            await msg.respond(b"null")

        await nc.subscribe("probe.echo", cb=answer)
        async with connect(os.environ["NATS_URL"]) as client:
            await client.call("probe.echo", None)
        print(sorted(seen[0]))
        await nc.close()

    asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("env", "traced"),
    [({}, False), ({"WITH_SDK": "1"}, True), ({"WITH_SDK": "1", "MESH_TRACING": "0"}, False)],
)
def test_trace_headers_only_when_tracing(nats_url, env, traced):
    done = run_script(PROBE, {"NATS_URL": nats_url, **env})
    assert done.returncode == 0, done.stderr
    assert ("traceparent" in done.stdout) is traced


# -- logging -------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    configure_logging(json=False)  # what the pytest plugin sets up


async def test_secret_headers_are_redacted_in_logs(serve, client, restore_logging):
    buffer = io.StringIO()
    configure_logging(json=True, stream=buffer)
    structlog.get_logger("test").info(
        "direct",
        headers={"Authorization": "Bearer abc", "X-Api-Key": "k1", "Correlation-Id": "c-1"},
        password="hunter2",
        user="ann",
    )
    svc = Service("guarded")

    @svc.rpc("peek")
    async def peek(req: Order, ctx: Context) -> Receipt:
        ctx.log.info("request headers", headers=ctx.headers)
        return Receipt(req.order_id, "ok")

    await serve(svc)
    await client.call(
        "guarded.peek",
        Order("o-9"),
        headers={"Authorization": "Bearer xyz", "Cookie": "s=1", "X-Tenant": "t1"},
    )
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    direct = next(line for line in lines if line["event"] == "direct")
    assert direct["headers"] == {
        "Authorization": REDACTED,
        "X-Api-Key": REDACTED,
        "Correlation-Id": "c-1",
    }
    assert (direct["password"], direct["user"]) == (REDACTED, "ann")
    logged = next(line for line in lines if line["event"] == "request headers")
    assert logged["headers"]["Authorization"] == REDACTED
    assert logged["headers"]["Cookie"] == REDACTED
    assert logged["headers"]["X-Tenant"] == "t1"
    assert "xyz" not in buffer.getvalue() and "Bearer" not in buffer.getvalue()


def test_json_off_a_terminal_console_on_one_and_stdlib_goes_through(restore_logging, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    # pytest's capture handlers sit on the root logger; an app's would be left alone too
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    piped = io.StringIO()
    configure_logging(stream=piped)
    structlog.get_logger("test").info("to a pipe", n=1)
    logging.getLogger("nats.aio.client").error("from the standard library")
    first, second = (json.loads(line) for line in piped.getvalue().splitlines())
    assert (first["event"], first["n"], first["level"]) == ("to a pipe", 1, "info")
    assert (second["event"], second["logger"]) == ("from the standard library", "nats.aio.client")

    terminal = Terminal()
    configure_logging(stream=terminal)
    structlog.get_logger("test").info("to a terminal", n=2)
    text = terminal.getvalue()
    assert "to a terminal" in text
    with pytest.raises(ValueError):
        json.loads(text.splitlines()[0])


def test_no_sdk_is_seen_at_once_when_a_provider_is_installed():
    """The cheap check reads the API's global: a provider set later counts at once."""
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from framework.observability import tracing as telemetry
        assert telemetry._no_sdk()
        trace.set_tracer_provider(TracerProvider())
        assert not telemetry._no_sdk()
        span = telemetry.start_send_span("publish", "x", None, trace.SpanKind.PRODUCER)
        assert span.is_recording()
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == "ok", done.stderr


async def test_metrics_for_a_job_kind(serve, client, sdk):
    """`mesh.job.*` report a kind's successes, failures and running jobs per `job.kind`."""
    if sdk.reader is None:
        pytest.skip("another module installed the MeterProvider first")
    svc = Service(unique("metered_jobs"))

    @svc.job("work", max_attempts=1)
    async def work(req: Order) -> Order:
        if req.order_id == "bad":
            raise Reject("cannot do it")
        return req

    await serve(svc)
    kind = f"{svc.name}.work"
    await (await client.enqueue(kind, Order("a"))).result(timeout=10)
    with pytest.raises(ServiceError):  # JobFailed
        await (await client.enqueue(kind, Order("bad"))).result(timeout=10)

    def settled() -> dict[str, list[Any]] | None:
        found = read_metrics(sdk.reader)  # type: ignore[arg-type]
        done = [
            p for p in found.get("mesh.job.failed", []) if dict(p.attributes) == {"job.kind": kind}
        ]
        return found if done and done[0].value == 1 else None

    found = await eventually(settled)
    assert point(found, "mesh.job.succeeded", **{"job.kind": kind}).value == 1
    assert point(found, "mesh.job.failed", **{"job.kind": kind}).value == 1
    assert point(found, "mesh.job.running", **{"job.kind": kind}).value == 0
