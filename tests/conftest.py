"""Fixtures shared by the test modules; helpers are in tests/support/.

The servers, clients and running services come from `framework.testing` (the pytest
plugin every project gets); what is here is about this repository: the sample shop's
test doubles and recorded spans. Imports happen inside the fixtures, so a module that
uses none of them never imports the shop or the OpenTelemetry SDK.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from support.shop import Outbox

    from framework.testing import Serve
    from services.payments import SimulatedProvider


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Outbox:
    """The shop's notifications go to a list (`outbox.sent`), not to a file."""
    from support.shop import Outbox

    from services import notifications

    recorder = Outbox()
    monkeypatch.setattr(notifications, "sender", recorder)
    return recorder


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> SimulatedProvider:
    """A fresh simulated card network for the shop's payments: no charges of other tests."""
    from services import payments

    fresh = payments.SimulatedProvider()
    monkeypatch.setattr(payments, "provider", fresh)
    return fresh


@pytest.fixture
async def shop(serve: Serve, outbox: Outbox, provider: SimulatedProvider) -> None:
    """The sample shop's saga services (`support.shop.SHOP`) running in the test's loop."""
    from support.shop import serve_shop

    await serve_shop(serve)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans finished while the module's tests run, in memory (`spans.get_finished_spans()`)."""
    from support.otel import recorded_spans

    with recorded_spans() as exporter:
        yield exporter
