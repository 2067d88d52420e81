"""Jobs on the web: the gateway's POST /reports and job SSE, the dashboard's jobs view and
its cancel and retry buttons, and a progress bar going 0 -> 100 % in a real browser."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import pytest_asyncio
from web_support import CHROMIUM_ARGS, Frame, chromium_path, http_server, read_frames

from framework import Service
from framework.testing import eventually
from framework.web.dashboard import create_app

pytest.importorskip("framework.jobs", reason="background jobs (framework.jobs) are not present")
from framework import JobContext  # after the skip: only where jobs exist

ACTION = {"X-Mesh-Dashboard": "1"}


class Render(msgspec.Struct):
    pages: int
    pause: float = 0.0


class Rendered(msgspec.Struct):
    url: str


class Reports:
    """A `reports` service whose `render` job reports progress page by page."""

    def __init__(self) -> None:
        self.service = Service("reports", version="1.0.0")
        self.gate = anyio.Event()

        @self.service.job("render", max_attempts=1)
        async def render(req: Render, job: JobContext) -> Rendered:
            if req.pages < 0:
                await self.gate.wait()  # held until the test lets it go (or cancels it)
            for page in range(req.pages):
                await anyio.sleep(req.pause)
                await job.progress((page + 1) / req.pages, f"page {page + 1} of {req.pages}")
            if req.pages == 0:
                raise RuntimeError("nothing to render")
            return Rendered(url=f"/reports/{job.job_id}.pdf")


@pytest_asyncio.fixture
async def reports(serve: Any) -> Reports:
    made = Reports()
    await serve(made.service)
    return made


@pytest_asyncio.fixture
async def gateway(
    reports: Reports, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("NATS_URL", nats_url)
    from services import gateway as module

    async with (
        http_server(module.app) as base,
        httpx.AsyncClient(base_url=base, timeout=15) as http,
    ):
        yield http


@pytest_asyncio.fixture
async def dashboard(reports: Reports, nats_url: str, tmp_path: Path) -> AsyncIterator[str]:
    async with http_server(create_app(nats_url, interval=0.3, trace_file=None)) as base:
        yield base


# --- the gateway -----------------------------------------------------------------------


async def test_post_reports_enqueues_and_the_job_streams_to_succeeded(
    gateway: httpx.AsyncClient,
) -> None:
    reply = await gateway.post("/reports", json={"pages": 4, "pause": 0.2})
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["kind"] == "reports.render"
    assert body["events_url"] == f"/jobs/reports.render/{body['id']}/events"
    frames: list[Frame] = []
    async with asyncio.timeout(15), gateway.stream("GET", body["events_url"]) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        async for frame in read_frames(response):
            frames.append(frame)
            if frame.event == "end":
                break
    statuses = [json.loads(f.data) for f in frames if f.event == "status"]
    assert [f.event for f in frames][-1] == "end"
    assert statuses[-1]["state"] == "succeeded"
    assert statuses[-1]["result"] == {"url": f"/reports/{body['id']}.pdf"}
    progress = [s["progress"] for s in statuses]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len(set(progress)) >= 3  # it moved in steps, not just 0 then done
    ids = [int(f.id) for f in frames if f.event == "status"]
    assert ids == list(range(1, len(ids) + 1))

    status = (await gateway.get(body["status_url"])).json()
    assert status["state"] == "succeeded"


async def test_job_events_of_an_unknown_job_is_404_before_streaming(
    gateway: httpx.AsyncClient,
) -> None:
    reply = await gateway.get("/jobs/reports.render/nope/events")
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/json"
    assert (await gateway.get("/jobs/reports.render/nope")).status_code == 404


async def test_a_kind_that_is_not_a_kind_is_422(gateway: httpx.AsyncClient) -> None:
    assert (await gateway.get("/jobs/notakind/x/events")).status_code == 422


async def test_a_report_request_the_worker_refuses_is_422(gateway: httpx.AsyncClient) -> None:
    reply = await gateway.post("/reports", json={"pages": "many"})
    assert reply.status_code == 422
    assert "pages" in reply.json()["error"]["message"]


async def test_the_request_id_is_the_jobs_correlation_id(gateway: httpx.AsyncClient) -> None:
    reply = await gateway.post("/reports", json={"pages": 1}, headers={"X-Request-Id": "rep-77"})
    status = (await gateway.get(reply.json()["status_url"])).json()
    assert status["correlation_id"] == "rep-77"


# --- the dashboard ---------------------------------------------------------------------


async def test_jobs_view_counts_by_kind_and_state(dashboard: str, client: Any) -> None:
    async with httpx.AsyncClient(base_url=dashboard) as http:
        handle = await client.enqueue("reports.render", Render(2), job_id="view-1")
        await handle.result(timeout=10)

        async def counted() -> bool:
            data = (await http.get("/api/jobs")).json()
            kinds = {k["kind"]: k["counts"] for k in data["kinds"]}
            rows = {(j["kind"], j["id"]): j for j in data["jobs"]}
            row = rows.get(("reports.render", "view-1"))
            return (
                kinds.get("reports.render", {}).get("succeeded") == 1
                and row is not None
                and row["progress"] == 1.0
            )

        await eventually(counted, what="the succeeded job counted and listed")


async def test_cancel_and_retry_from_the_dashboard_api(
    dashboard: str, client: Any, reports: Reports
) -> None:
    handle = await client.enqueue("reports.render", Render(-1), job_id="held-1")
    await eventually(lambda: _state(handle, "running"), what="the job running")
    async with httpx.AsyncClient(base_url=dashboard) as http:
        refused = await http.post("/api/jobs/reports.render/held-1/cancel")
        assert refused.status_code == 403
        cancel = await http.post("/api/jobs/reports.render/held-1/cancel", headers=ACTION)
        assert cancel.status_code == 200 and cancel.json()["cancelled"] is True
        await eventually(lambda: _state(handle, "cancelled"), what="the job cancelled")
        again = await http.post("/api/jobs/reports.render/held-1/cancel", headers=ACTION)
        assert again.json() == {
            "cancelled": False,
            "message": "already finished: nothing to cancel",
        }

        reports.gate.set()
        retry = await http.post("/api/jobs/reports.render/held-1/retry", headers=ACTION)
        assert retry.status_code == 200, retry.text
        await eventually(lambda: _state(handle, "succeeded"), what="the retried job run again")
        missing = await http.post("/api/jobs/reports.render/nope/cancel", headers=ACTION)
        assert missing.status_code == 404
        bad = await http.get("/api/jobs/notakind/x")
        assert bad.status_code == 422


async def _state(handle: Any, state: str) -> bool:
    return bool((await handle.status()).state == state)


# --- in a browser ----------------------------------------------------------------------


@pytest.mark.skipif(chromium_path() is None, reason="no Chromium: `apt-get install chromium`")
async def test_a_progress_bar_goes_from_0_to_100_percent_without_a_reload(
    dashboard: str, client: Any
) -> None:
    import os

    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 860})
        await page.goto(dashboard + "/#jobs")
        await page.wait_for_selector('#job-kinds tr[data-kind="reports.render"]')
        await page.evaluate(
            """() => {
                window.notReloaded = true;
                window.seen = [];
                new MutationObserver(() => {
                    const bar = document.querySelector('tr[data-job="reports.render/bar-1"] progress');
                    if (bar && window.seen.at(-1) !== bar.value) window.seen.push(bar.value);
                }).observe(document.getElementById("jobs"), {subtree: true, childList: true});
            }"""
        )
        await client.enqueue("reports.render", Render(5, 0.5), job_id="bar-1")
        done = 'tr[data-job="reports.render/bar-1"][data-state="succeeded"]'
        await page.wait_for_function(  # part way: running, and the bar has moved
            """() => {
                const bar = document.querySelector('tr[data-job="reports.render/bar-1"] progress');
                return bar !== null && bar.value >= 40 && bar.value < 100;
            }""",
            timeout=10_000,
        )
        if os.environ.get("MESH_SCREENSHOTS"):
            await page.screenshot(
                path=os.path.join(os.environ["MESH_SCREENSHOTS"], "dashboard-jobs.png")
            )
        await page.wait_for_selector(done, timeout=15_000)
        seen = await page.evaluate("window.seen")
        assert await page.evaluate("window.notReloaded") is True
        await browser.close()
    assert seen[0] <= 20 and seen[-1] == 100, seen
    assert seen == sorted(seen) and len(set(seen)) >= 3, seen
