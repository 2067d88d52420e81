"""`mesh dashboard` over real HTTP: the JSON API, the live stream, actions and bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from web_support import Frame, Parcel, Shipping, http_server, read_frames

from framework import Service
from framework.testing import eventually
from framework.web.dashboard import create_app

ACTION = {"X-Mesh-Dashboard": "1"}


@pytest.fixture
def shipping() -> Shipping:
    return Shipping()


@pytest_asyncio.fixture
async def dashboard(
    serve: Any, nats_url: str, shipping: Shipping, tmp_path: Path
) -> AsyncIterator[str]:
    await serve(shipping.service)
    app = create_app(nats_url, interval=0.2, trace_file=tmp_path / "traces.jsonl")
    async with http_server(app) as base:
        yield base


@pytest_asyncio.fixture
async def http(dashboard: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=dashboard, timeout=10) as c:
        yield c


async def view(http: httpx.AsyncClient, name: str) -> Any:
    reply = await http.get(f"/api/{name}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def service_of(data: Any, name: str) -> dict[str, Any] | None:
    return next((s for s in data["services"] if s["name"] == name), None)


async def dead_letter_ids(http: httpx.AsyncClient) -> list[int]:
    return [row["id"] for row in (await view(http, "deadletters"))["rows"]]


async def poison(client: Any, http: httpx.AsyncClient, parcel: str) -> int:
    await client.publish("parcel.shipped.v1", Parcel(parcel))
    found: list[int] = []

    async def dead() -> bool:
        found[:] = await dead_letter_ids(http)
        return bool(found)

    await eventually(dead, what="a dead letter in /api/deadletters")
    return found[-1]


# --- views -----------------------------------------------------------------------------


async def test_index_page_and_static_files_are_served(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert "mesh dashboard" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        reply = await http.get(asset)
        assert reply.status_code == 200 and len(reply.content) > 1000
    assert "cdn" not in page.text.lower() and "https://" not in page.text


async def test_services_view_counts_change_after_calls(
    http: httpx.AsyncClient, client: Any
) -> None:
    first = service_of(await view(http, "services"), "shipping")
    assert first is not None
    assert (first["version"], first["description"], first["up"], first["down"]) == (
        "2.1.0",
        "Ships parcels",
        1,
        0,
    )
    kinds = {e["name"]: e["kind"] for e in first["endpoints"]}
    assert kinds == {"quote": "rpc", "on_shipped": "subscriber"}
    before = first["requests"]
    for n in range(7):
        await client.call("shipping.quote", Parcel(f"p{n}"))

    async def counted() -> bool:
        now = service_of(await view(http, "services"), "shipping")
        return now is not None and now["requests"] == before + 7 and now["rate"] > 0

    await eventually(counted, what="7 more requests and a rate above 0")


async def test_a_stopped_instance_is_shown_down(http: httpx.AsyncClient, nats_url: str) -> None:
    extra = Service("ephemeral", version="0.1.0")

    @extra.rpc("ping")
    async def ping() -> str:
        return "pong"

    async with extra.serve(nats_url):

        async def up() -> bool:
            s = service_of(await view(http, "services"), "ephemeral")
            return s is not None and s["up"] == 1

        await eventually(up, what="the instance listed up")

    async def down() -> bool:
        s = service_of(await view(http, "services"), "ephemeral")
        return s is not None and s["down"] == 1 and not s["instances"][0]["up"]

    await eventually(down, what="the stopped instance listed down")


async def test_streams_view_shows_consumer_lag_and_its_history(
    http: httpx.AsyncClient, client: Any
) -> None:
    from nats.js.api import ConsumerConfig

    from framework import Stream
    from framework.streams import ensure_stream

    await ensure_stream(client, Stream("EVENTS_CRATE", ["events.crate.>"]))
    await client.js.add_consumer("EVENTS_CRATE", ConsumerConfig(durable_name="idle_reader"))
    for n in range(3):
        await client.publish("crate.packed.v1", {"n": n})

    async def lagging() -> bool:
        streams = {s["name"]: s for s in (await view(http, "streams"))["streams"]}
        crate = streams.get("EVENTS_CRATE")
        if crate is None or crate["messages"] != 3 or crate["kind"] != "events":
            return False
        consumer = crate["consumers"][0]
        return (
            consumer["name"] == "idle_reader"
            and consumer["pending"] == 3
            and len(consumer["lag_history"]) >= 3
        )

    await eventually(lagging, what="3 pending on idle_reader with a lag history")


async def test_traces_view_renders_trees_from_the_trace_file(
    http: httpx.AsyncClient, tmp_path: Path
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind

    from framework.observability.trace_file import SpanFileExporter

    provider = TracerProvider()  # not the global one: spans go to this file only
    provider.add_span_processor(SimpleSpanProcessor(SpanFileExporter(tmp_path / "traces.jsonl")))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request orders.create", kind=SpanKind.CLIENT) as root:
        with tracer.start_as_current_span("process orders.create", kind=SpanKind.SERVER):
            pass
    trace_id = f"{root.get_span_context().trace_id:032x}"

    async def shown() -> bool:
        traces = (await view(http, "traces"))["traces"]
        return bool(traces) and traces[0]["trace_id"] == trace_id

    await eventually(shown, what="the trace in /api/traces")
    first = (await view(http, "traces"))["traces"][0]
    assert first["spans"] == 2
    assert first["tree"].startswith(f"trace {trace_id}")
    assert "└─ process orders.create" in first["tree"]


async def test_health_says_where_it_is_connected(http: httpx.AsyncClient, nats_url: str) -> None:
    health = await view(http, "health")
    assert health["connected"] is True
    assert health["server"] == nats_url
    assert health["errors"] == {}


async def test_unknown_view_is_a_json_404(http: httpx.AsyncClient) -> None:
    reply = await http.get("/api/nothing")
    assert reply.status_code == 404
    assert "no view 'nothing'" in reply.json()["error"]["message"]


# --- the live stream -------------------------------------------------------------------


async def test_stream_sends_every_view_then_changes(http: httpx.AsyncClient, client: Any) -> None:
    frames: list[Frame] = []
    async with asyncio.timeout(10), http.stream("GET", "/api/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = read_frames(response)
        async for frame in lines:
            frames.append(frame)
            if {"health", "services", "streams", "deadletters", "traces"} <= {
                f.event for f in frames
            }:
                break
        await client.call("shipping.quote", Parcel("p"))
        async for frame in lines:
            frames.append(frame)
            if (
                frame.event == "services"
                and service_of(json.loads(frame.data), "shipping")["requests"]
            ):  # type: ignore[index]
                break
    ids = [int(f.id) for f in frames if f.id]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # versions only grow
    assert all(json.loads(f.data) is not None for f in frames)


# --- dead letters: show, replay, discard -----------------------------------------------


async def test_dead_letter_detail_replay_and_removal(
    http: httpx.AsyncClient, client: Any, shipping: Shipping
) -> None:
    letter_id = await poison(client, http, "p-1")
    detail = (await http.get(f"/api/deadletters/{letter_id}")).json()
    assert (detail["service"], detail["handler"], detail["reason"]) == (
        "shipping",
        "on_shipped",
        "rejected",
    )
    assert "cannot ship p-1 yet" in detail["error"]
    assert json.loads(detail["data"]) == {"parcel_id": "p-1"}
    assert detail["headers"]["Event-Type"] == "parcel.shipped.v1"

    shipping.fixed = True
    reply = await http.post(f"/api/deadletters/{letter_id}/replay", headers=ACTION)
    assert reply.status_code == 200, reply.text
    assert reply.json()["subject"] == "events.parcel.shipped.v1"
    await eventually(lambda: shipping.handled == ["p-1"], what="the fixed handler handling it")
    await eventually(lambda: _gone(http, letter_id), what="the row gone from the view")
    assert (await http.get(f"/api/deadletters/{letter_id}")).status_code == 404


async def _gone(http: httpx.AsyncClient, letter_id: int) -> bool:
    return letter_id not in await dead_letter_ids(http)


async def test_discard_deletes_and_a_second_discard_is_404(
    http: httpx.AsyncClient, client: Any, shipping: Shipping
) -> None:
    letter_id = await poison(client, http, "p-2")
    reply = await http.post(f"/api/deadletters/{letter_id}/discard", headers=ACTION)
    assert reply.status_code == 200 and reply.json() == {"discarded": letter_id}
    await eventually(lambda: _gone(http, letter_id))
    again = await http.post(f"/api/deadletters/{letter_id}/discard", headers=ACTION)
    assert again.status_code == 404
    assert again.json()["error"]["message"] == f"no dead letter {letter_id}"
    replay = await http.post(f"/api/deadletters/{letter_id}/replay", headers=ACTION)
    assert replay.status_code == 404
    assert shipping.handled == []


async def test_replay_whose_stream_is_gone_is_409_and_keeps_the_letter(
    http: httpx.AsyncClient, client: Any
) -> None:
    letter_id = await poison(client, http, "p-3")
    await client.js.delete_stream("EVENTS_PARCEL")
    reply = await http.post(f"/api/deadletters/{letter_id}/replay", headers=ACTION)
    assert reply.status_code == 409
    message = reply.json()["error"]["message"]
    assert "no stream" in message and "stream it came from is gone" in message
    assert (await http.get(f"/api/deadletters/{letter_id}")).status_code == 200


@pytest.mark.parametrize(
    "path", ["/api/deadletters/0", "/api/deadletters/999999", "/api/deadletters/abc"]
)
async def test_unknown_dead_letter_ids_are_404(http: httpx.AsyncClient, path: str) -> None:
    reply = await http.get(path)
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/json"


async def test_actions_need_the_dashboard_header(http: httpx.AsyncClient, client: Any) -> None:
    letter_id = await poison(client, http, "p-4")
    for action in ("replay", "discard"):
        reply = await http.post(f"/api/deadletters/{letter_id}/{action}")
        assert reply.status_code == 403
        assert "X-Mesh-Dashboard" in reply.json()["error"]["message"]
    assert letter_id in await dead_letter_ids(http)


async def test_an_oversized_action_body_is_413(http: httpx.AsyncClient) -> None:
    reply = await http.post("/api/deadletters/1/replay", headers=ACTION, content=b"x" * 200_000)
    assert reply.status_code == 413


async def test_a_foreign_host_header_is_refused(http: httpx.AsyncClient) -> None:
    reply = await http.get("/api/services", headers={"Host": "evil.example"})
    assert reply.status_code == 400


async def test_wrong_method_is_405_not_500(http: httpx.AsyncClient) -> None:
    reply = await http.get("/api/deadletters/1/replay")
    assert reply.status_code == 405


async def test_pages_leaving_the_stream_leave_no_task_behind(dashboard: str) -> None:
    async def open_and_leave() -> None:
        async with (
            httpx.AsyncClient(base_url=dashboard) as alone,
            alone.stream("GET", "/api/stream") as response,
        ):
            async for frame in read_frames(response):
                if frame.event == "services":
                    return  # streaming: leave mid-stream

    await open_and_leave()  # warm-up: sse-starlette's one shutdown watcher per loop
    await asyncio.sleep(0.3)
    tasks = len(asyncio.all_tasks())
    for _ in range(5):
        await open_and_leave()
    await eventually(
        lambda: len(asyncio.all_tasks()) <= tasks,
        what=lambda: f"{len(asyncio.all_tasks())} tasks, {tasks} before the streams",
    )
