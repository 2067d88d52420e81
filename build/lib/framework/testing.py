"""Pytest plugin: real NATS servers, clients and running services as fixtures.

Registered through the ``pytest11`` entry point, so any project that installs the
framework gets ``nats_server``, ``nats_url``, ``nats_cluster``, ``client`` and
``serve``. Only :mod:`framework.dev.devserver` is imported eagerly; the client and
service modules are imported inside the fixtures, so the plugin (and with it every
test run) still loads while one of them is broken.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from framework.dev.devserver import NatsCluster, NatsServer

__all__ = ["Serve", "client", "eventually", "nats_cluster", "nats_server", "nats_url", "serve"]


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> None:
    """Poll `predicate` (sync or async) until it is true; fail the test after `timeout`.

    Messaging tests wait for things that happen elsewhere (a redelivery, a consumer
    catching up): polling with a deadline instead of fixed sleeps keeps them fast and
    makes a failure say what never happened (`what`, or a callable giving a report).
    """
    import inspect

    import anyio

    try:
        with anyio.fail_after(timeout):
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await anyio.sleep(interval)
    except TimeoutError:
        detail = what() if callable(what) else what
        raise AssertionError(f"timed out after {timeout}s waiting for {detail}") from None


class _Servable(Protocol):
    def serve(self, url: str, /) -> AbstractAsyncContextManager[Any]: ...


class Serve(Protocol):
    """Type of the ``serve`` fixture: ``await serve(service[, url])``."""

    def __call__(self, service: _Servable, url: str | None = None) -> Awaitable[None]: ...


def pytest_configure(config: pytest.Config) -> None:
    """Readable log lines on stderr, where pytest shows them next to a failure."""
    from framework.observability.logging import configure_logging

    configure_logging(json=False)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh JetStream server per test: no state leaks between tests."""
    server = NatsServer(store_dir=tmp_path / "nats")
    with server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster, meta leader elected, for replication and node loss."""
    with NatsCluster(3, base_dir=tmp_path / "cluster") as cluster:
        yield cluster


@pytest_asyncio.fixture
async def client(nats_url: str) -> AsyncIterator[Any]:
    """A connected ``framework.client.Client`` on the test's server."""
    from framework.client import connect

    async with connect(nats_url) as connected:
        yield connected


@pytest_asyncio.fixture
async def serve(nats_url: str) -> AsyncIterator[Serve]:
    """Run services inside the test's loop until teardown, stopped in reverse order.

    Each service runs in a task of its own: pytest-asyncio sets up and tears down async
    fixtures in different tasks, and a service's task group must be entered and left in
    one. Defaults to the test's server; pass ``url`` (e.g. ``nats_cluster.url``).
    """
    import asyncio

    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def _serve(service: _Servable, url: str | None = None) -> None:
        started, stop = asyncio.Event(), asyncio.Event()

        async def run() -> None:
            async with service.serve(url or nats_url):
                started.set()
                await stop.wait()

        task = asyncio.create_task(run())
        running.append((stop, task))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # the service failed to start: raise its error here

    yield _serve
    for stop, task in reversed(running):
        stop.set()
        with contextlib.suppress(Exception):
            await task
