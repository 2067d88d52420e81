"""The dashboard and the gateway in a real browser: headless Chromium driven by Playwright.

Debian's `chromium` package is used (`.ci/run` installs it); Playwright's own browser
downloads are never used. Without a Chromium these tests skip and say why.
`MESH_SCREENSHOTS=docs` saves the screenshots the README shows.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from support.shop import Outbox, SlowProvider, serve_shop
from web_support import CHROMIUM_ARGS, Parcel, Shipping, chromium_path, http_server

from framework.testing import eventually
from framework.web.dashboard import create_app
from services import payments

playwright_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium to drive: `apt-get install chromium` (Debian) or set CHROMIUM_PATH",
)
VIEWPORT = {"width": 1280, "height": 860}


@pytest_asyncio.fixture
async def page() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await browser.new_context(viewport=VIEWPORT)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        await browser.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"


@pytest_asyncio.fixture
async def shop(serve: Any, outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(payments, "provider", SlowProvider(1.0))  # watching before it is final
    await serve_shop(serve)


@pytest_asyncio.fixture
async def dashboard(nats_url: str, tmp_path: Path) -> AsyncIterator[str]:
    async with http_server(
        create_app(nats_url, interval=0.3, trace_file=tmp_path / "t.jsonl")
    ) as base:
        yield base


async def screenshot(page: Any, name: str) -> None:
    target = os.environ.get("MESH_SCREENSHOTS")
    if target:
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=os.path.join(target, f"{name}.png"), full_page=False)


async def text(page: Any, selector: str) -> str:
    element = await page.query_selector(selector)
    return "" if element is None else str(await element.inner_text()).strip()


def order(cents: int, customer: str = "alice") -> dict[str, Any]:
    return {
        "customer_id": customer,
        "items": [{"sku": "book-dune", "quantity": 1, "unit_price_cents": cents}],
    }


async def test_services_are_listed_with_counts_that_change_live(
    shop: None, dashboard: str, page: Any, client: Any
) -> None:
    await page.goto(dashboard + "/")
    for name in ("orders", "payments", "notifications"):
        await page.wait_for_selector(f'article[data-service="{name}"]')
    await page.evaluate("window.notReloaded = true")
    total = 'article[data-service="orders"] dd[data-field="requests"]'
    create = 'article[data-service="orders"] tr[data-endpoint="create"] td[data-field="requests"]'
    before = int(await text(page, total))
    assert await text(page, create) == "0"
    for n in range(3):
        await client.call("orders.create", order(1000 + n))
    await page.wait_for_function(
        f"document.querySelector('{create}').textContent === '3'", timeout=10_000
    )
    assert int(await text(page, total)) >= before + 3
    assert await page.evaluate("window.notReloaded") is True  # updated in place, over SSE
    await screenshot(page, "dashboard-services")

    await page.keyboard.press("2")  # keyboard navigation to the streams view
    await page.wait_for_selector('article[data-stream="EVENTS_ORDER"] tr[data-consumer]')
    await screenshot(page, "dashboard-streams")
    await page.keyboard.press("6")
    await page.wait_for_selector('#catalog-table tr[data-operation="orders_create"]')
    await screenshot(page, "dashboard-catalog")


async def test_a_dead_letter_appears_and_replay_from_the_page_gets_it_handled(
    serve: Any, dashboard: str, page: Any, client: Any
) -> None:
    shipping = Shipping()
    await serve(shipping.service)
    await page.goto(dashboard + "/#deadletters")
    await page.wait_for_selector("#dl-empty")
    await client.publish("parcel.shipped.v1", Parcel("parcel-9"))
    row = await page.wait_for_selector("tr[data-letter-id]", timeout=10_000)
    letter_id = await row.get_attribute("data-letter-id")
    assert "cannot ship parcel-9 yet" in await row.inner_text()

    await page.click(f'button[data-key="show-{letter_id}"]')  # the detail dialog
    await page.wait_for_selector("#letter-dialog[open]")
    assert "parcel-9" in await text(page, "#letter-payload")
    await screenshot(page, "dashboard-deadletter")
    await page.keyboard.press("Escape")
    await page.wait_for_selector("#letter-dialog", state="hidden")

    shipping.fixed = True  # the handler is fixed (a new deploy); now replay, by keyboard
    await page.focus(f'button[data-key="replay-{letter_id}"]')
    await page.keyboard.press("Enter")
    await eventually(lambda: shipping.handled == ["parcel-9"], what="the replayed event handled")
    await page.wait_for_selector(
        f'tr[data-letter-id="{letter_id}"]', state="detached", timeout=10_000
    )
    assert "Replayed" in await text(page, "#dl-message")


async def test_an_order_placed_through_the_gateway_streams_to_confirmed(
    shop: None, page: Any, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", nats_url)
    from services import gateway

    async with http_server(gateway.app) as base:
        await page.goto(base + "/")
        await page.click("form#order button")
        await page.wait_for_function(
            "[...document.querySelectorAll('#events li')].some((li) => li.textContent === 'end')",
            timeout=15_000,
        )
        steps = [str(s).strip() for s in await page.locator("#events li").all_inner_texts()]
        await screenshot(page, "gateway-order-events")
    assert steps == ["order created (pending)", "payment.captured.v1", "order.confirmed.v1", "end"]
