"""Pytest plugin: real NATS servers, clients and running services as fixtures.

Registered through the ``pytest11`` entry point, so any project that installs the
framework gets ``nats_server``, ``nats_url``, ``nats_cluster``, ``client`` and
``serve``. Only :mod:`framework.devserver` is imported eagerly; the client and
service modules are imported inside the fixtures, so the plugin (and with it every
test run) still loads while one of them is broken.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio

from framework.devserver import NatsCluster, NatsServer

__all__ = ["Serve", "client", "nats_cluster", "nats_server", "nats_url", "serve"]


class _Servable(Protocol):
    def serve(self, url: str, /) -> AbstractAsyncContextManager[Any]: ...


class Serve(Protocol):
    """Type of the ``serve`` fixture: ``await serve(service[, url])``."""

    def __call__(self, service: _Servable, url: str | None = None) -> Awaitable[None]: ...


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

    Defaults to the test's server; pass ``url`` (e.g. ``nats_cluster.url``) for another.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def _serve(service: _Servable, url: str | None = None) -> None:
            await stack.enter_async_context(service.serve(url or nats_url))

        yield _serve
