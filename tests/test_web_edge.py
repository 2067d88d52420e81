"""framework.web in a user's own app: errors to HTTP, SSE framing, ids and traces, cleanup.

Every app here is served by uvicorn on a loopback port and called over real HTTP; the
services behind it run on a real nats-server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import pytest_asyncio
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from web_support import Frame, http_server, read_frames

from framework import Context, Service, ServiceError
from framework.errors import NoResponders
from framework.testing import eventually
from framework.web import MeshEdge, ServerSentEvent, correlation_id, http_status, sse


class Echo(msgspec.Struct):
    text: str


class Seen(msgspec.Struct):
    correlation_id: str
    traceparent: str
    trace_id: str


backend = Service("backend", version="1.0.0")


@backend.rpc("fail")
async def fail(req: dict[str, Any]) -> None:
    raise ServiceError(int(req["code"]), f"failed with {req['code']}")


@backend.rpc("slow")
async def slow() -> None:
    await anyio.sleep(1)


@backend.rpc("crash")
async def crash() -> None:
    raise RuntimeError("secret internal detail")


@backend.rpc("seen")
async def seen(ctx: Context) -> Seen:
    span_context = ctx.span.get_span_context()
    return Seen(
        ctx.correlation_id,
        ctx.headers.get("traceparent", ""),
        format(span_context.trace_id, "032x") if span_context.is_valid else "",
    )


def make_app(edge: MeshEdge) -> FastAPI:
    app = FastAPI(lifespan=edge.lifespan)
    edge.install(app)

    @app.post("/fail/{code}")
    async def fail_route(code: int) -> Any:
        return await edge.call("backend.fail", {"code": code})

    @app.get("/slow")
    async def slow_route() -> Any:
        return await edge.call("backend.slow", timeout=0.3)

    @app.get("/crash")
    async def crash_route() -> Any:
        return await edge.call("backend.crash")

    @app.get("/nobody")
    async def nobody_route() -> Any:
        return await edge.call("nobody.home")

    @app.get("/bug")
    async def bug_route() -> Any:
        raise KeyError("a bug in the app itself")

    @app.get("/seen")
    async def seen_route() -> Any:
        return {"handler": await edge.call("backend.seen"), "http": correlation_id()}

    @app.get("/events/{key}")
    async def events_route(key: str, ping: float = 15.0) -> Any:
        watch = edge.events(
            "demo.>",
            where=lambda e: e.data.get("key") == key,
            until=lambda e: e.type == "demo.done.v1",
        )
        return sse(watch, ping=ping)

    @app.get("/numbers")
    async def numbers_route() -> Any:
        async def numbers() -> AsyncIterator[Any]:
            yield {"n": 1}
            yield ServerSentEvent(data="two\nlines", event="custom", id="x-2")
            yield Echo("three")

        return sse(numbers())

    return app


@pytest.fixture
def edge(nats_url: str) -> MeshEdge:
    return MeshEdge(nats_url, name="edge-test")


@pytest_asyncio.fixture
async def base(serve: Any, edge: MeshEdge) -> AsyncIterator[str]:
    await serve(backend)
    async with http_server(make_app(edge)) as url:
        yield url


@pytest_asyncio.fixture
async def http(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        yield c


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (400, 422),
        (404, 404),
        (409, 409),
        (429, 429),
        (418, 400),
        (500, 502),
        (503, 503),
        (507, 502),
    ],
)
async def test_service_errors_map_to_http_statuses(
    http: httpx.AsyncClient, code: int, status: int
) -> None:
    reply = await http.post(f"/fail/{code}")
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["message"] == f"failed with {code}"
    assert error["service"] == "backend"
    assert error["request_id"] == reply.headers["x-request-id"]


async def test_a_deadline_exceeded_is_504(http: httpx.AsyncClient) -> None:
    reply = await http.get("/slow")
    assert reply.status_code == 504
    error = reply.json()["error"]
    assert error["mesh_code"] == 408  # the caller's timeout, or the server's deadline check
    assert "no reply from backend.slow" in error["message"] or "deadline" in error["message"]


async def test_no_responders_is_503(http: httpx.AsyncClient) -> None:
    reply = await http.get("/nobody")
    assert reply.status_code == 503
    assert "nothing serves nobody.home" in reply.json()["error"]["message"]


async def test_a_handler_crash_is_502_without_its_traceback(http: httpx.AsyncClient) -> None:
    reply = await http.get("/crash")
    assert reply.status_code == 502
    assert "secret internal detail" not in reply.text


async def test_a_bug_in_the_app_is_a_json_500_not_an_html_page(http: httpx.AsyncClient) -> None:
    reply = await http.get("/bug")
    assert reply.status_code == 500
    assert reply.headers["content-type"] == "application/json"
    assert "a bug in the app" not in reply.text
    assert reply.json()["error"]["request_id"] == reply.headers["x-request-id"]


async def test_unknown_route_is_a_json_404(http: httpx.AsyncClient) -> None:
    reply = await http.get("/no/such/route")
    assert reply.status_code == 404
    assert reply.json()["error"]["message"] == "Not Found"


def test_http_status_table() -> None:
    assert [http_status(ServiceError(c, "")) for c in (400, 404, 408, 503, 500, 302)] == [
        422,
        404,
        504,
        503,
        502,
        502,
    ]
    assert http_status(NoResponders("x")) == 503


# --- correlation and trace -------------------------------------------------------------


async def test_request_id_becomes_the_correlation_id_in_the_service(
    http: httpx.AsyncClient,
) -> None:
    reply = await http.get("/seen", headers={"X-Request-Id": "abc-123"})
    assert reply.headers["x-request-id"] == "abc-123"
    assert reply.json()["handler"]["correlation_id"] == "abc-123"
    assert reply.json()["http"] == "abc-123"


async def test_without_a_request_id_one_is_made_and_used(http: httpx.AsyncClient) -> None:
    reply = await http.get("/seen")
    made = reply.headers["x-request-id"]
    assert len(made) == 24
    assert reply.json()["handler"]["correlation_id"] == made


def starlette_app(edge: MeshEdge) -> Starlette:
    async def seen_route(request: Request) -> JSONResponse:
        return JSONResponse({"handler": await edge.call("backend.seen")})

    app = Starlette(routes=[Route("/seen", seen_route)], lifespan=edge.lifespan)
    edge.install(app)
    return app


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
async def test_traceparent_continues_into_the_mesh_as_one_trace(
    serve: Any, edge: MeshEdge, spans: InMemorySpanExporter, framework: str
) -> None:
    await serve(backend)
    app = make_app(edge) if framework == "fastapi" else starlette_app(edge)
    trace_id, browser_span = (
        f"4bf92f3577b34da6a3ce929d0e0e47{len(framework):02x}",
        "00f067aa0ba902b7",
    )
    async with http_server(app) as url, httpx.AsyncClient(base_url=url) as http:
        reply = await http.get("/seen", headers={"traceparent": f"00-{trace_id}-{browser_span}-01"})
    assert reply.json()["handler"]["trace_id"] == trace_id

    def tree() -> list[Any]:
        return [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]

    await eventually(lambda: len(tree()) >= 3, what="HTTP, CLIENT and SERVER spans")
    spans_by_id = {s.context.span_id: s for s in tree()}
    process = next(s for s in tree() if s.name == "process backend.seen")
    chain = [process]
    while chain[-1].parent is not None and chain[-1].parent.span_id in spans_by_id:
        chain.append(spans_by_id[chain[-1].parent.span_id])
    names = [s.name for s in chain]
    assert names[:2] == ["process backend.seen", "request backend.seen"]
    edge_span = chain[-1]  # the edge's SERVER span: the root, under the browser's span
    assert (edge_span.name, edge_span.kind) == ("GET /seen", trace.SpanKind.SERVER)
    assert f"{edge_span.parent.span_id:016x}" == browser_span
    assert edge_span.attributes["http.response.status_code"] == 200
    assert edge_span.attributes["http.route"] == "/seen"
    # nothing else hangs directly under the browser's span: one trace, one tree
    assert [s.name for s in tree() if f"{s.parent.span_id:016x}" == browser_span] == ["GET /seen"]


# --- server-sent events ----------------------------------------------------------------


async def test_sse_framing_names_numbers_and_ends(http: httpx.AsyncClient) -> None:
    async with http.stream("GET", "/numbers") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        raw = (await response.aread()).decode()
    frames = raw.replace("\r\n", "\n").split("\n\n")
    assert frames[0] == 'id: 1\nevent: message\ndata: {"n":1}'
    assert frames[1] == "id: x-2\nevent: custom\ndata: two\ndata: lines"
    assert frames[2] == 'id: 3\nevent: message\ndata: {"text":"three"}'
    assert frames[3] == "event: end\ndata: {}"


async def test_mesh_events_stream_filtered_with_heartbeats(
    http: httpx.AsyncClient, client: Any
) -> None:
    from framework import Stream
    from framework.streams import ensure_stream

    await ensure_stream(client, Stream("DEMO", ["events.demo.>"]))
    frames: list[Frame] = []
    async with asyncio.timeout(10), http.stream("GET", "/events/k1?ping=0.2") as response:
        lines = read_frames(response)
        await client.publish("demo.other.v1", {"key": "k2"})  # filtered out
        await client.publish("demo.step.v1", {"key": "k1", "n": 1}, event_id="step-1")
        async for frame in lines:
            frames.append(frame)
            if frame.event == "demo.step.v1":
                break
        async for frame in lines:  # idle now: heartbeats arrive
            frames.append(frame)
            if sum(1 for f in frames if f.comments) >= 2:
                break
        await client.publish("demo.done.v1", {"key": "k1"}, event_id="done-1")
        async for frame in lines:
            frames.append(frame)
            if frame.event == "end":
                break
    events = [(f.event, f.id, f.data) for f in frames if not f.comments]
    assert events == [
        ("demo.step.v1", "step-1", '{"key":"k1","n":1}'),
        ("demo.done.v1", "done-1", '{"key":"k1"}'),
        ("end", None, "{}"),
    ]
    assert all(c.startswith("ping") for f in frames for c in f.comments)


async def test_a_client_leaving_mid_stream_leaves_no_task_or_subscription(
    http: httpx.AsyncClient, base: str, edge: MeshEdge
) -> None:
    async def open_and_leave() -> None:
        async with (
            httpx.AsyncClient(base_url=base) as alone,
            alone.stream("GET", "/events/k9?ping=0.1") as response,
        ):
            async for frame in read_frames(response):
                if frame.comments:
                    assert len(edge.client.nc._subs) > subscriptions  # the watch is live
                    return  # leave mid-stream, without reading the rest

    subscriptions = len(edge.client.nc._subs)
    await open_and_leave()  # warm-up: sse-starlette starts one shutdown watcher per loop
    await eventually(lambda: len(edge.client.nc._subs) == subscriptions)
    await anyio.sleep(0.3)
    tasks = len(asyncio.all_tasks())
    for _ in range(5):
        await open_and_leave()
    await eventually(
        lambda: len(asyncio.all_tasks()) <= tasks and len(edge.client.nc._subs) == subscriptions,
        what=lambda: (
            f"{len(asyncio.all_tasks())} tasks ({tasks} before the streams), "
            f"{len(edge.client.nc._subs)} subscriptions ({subscriptions} before)"
        ),
    )


# --- a plain Starlette app gets the same -----------------------------------------------


async def test_a_starlette_app_gets_the_same_mapping(serve: Any, nats_url: str) -> None:
    await serve(backend)
    edge = MeshEdge(nats_url)

    async def route(request: Request) -> JSONResponse:
        return JSONResponse(await edge.call("backend.fail", {"code": 404}))

    app = Starlette(routes=[Route("/x", route)], lifespan=edge.lifespan)
    edge.install(app)
    async with http_server(app) as url, httpx.AsyncClient(base_url=url) as c:
        reply = await c.get("/x")
    assert reply.status_code == 404
    assert json.loads(reply.text)["error"]["message"] == "failed with 404"


def test_the_client_exists_only_while_the_app_runs() -> None:
    with pytest.raises(RuntimeError, match="lifespan"):
        MeshEdge().client  # noqa: B018
