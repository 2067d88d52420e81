"""One error family: every framework error is a `MeshError`, and the public API raises
no nats-py exception (a closed client, a refused stream, a bad dead-letter id).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
import pytest

import framework
from framework import (
    AuthorizationFailed,
    BadRequest,
    ClientClosed,
    ConfigConflict,
    ConnectionFailed,
    Context,
    DeadlineExceeded,
    InvalidHandler,
    InvalidName,
    JetStreamError,
    MeshError,
    NoResponders,
    NoStream,
    NotFound,
    PermissionDenied,
    PublishError,
    Reject,
    RemoteError,
    Service,
    ServiceError,
    Stream,
    connect,
    get_dead_letter,
    list_dead_letters,
)
from framework import errors as errors_module

PACKAGE = Path(framework.__file__).parent


class Ping(msgspec.Struct):
    n: int


def _error_classes() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors_module.__name__
    ]


def test_every_framework_error_has_one_root() -> None:
    classes = _error_classes()
    assert len(classes) >= 17
    assert all(issubclass(cls, MeshError) for cls in classes), classes
    exported = [getattr(framework, n) for n in framework.__all__]
    for obj in exported:
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, MeshError), obj


def test_the_hierarchy_is_drawn_in_the_module_docstring() -> None:
    doc = errors_module.__doc__ or ""
    for cls in _error_classes():
        if not cls.__name__.startswith("_"):
            assert cls.__name__ in doc, f"{cls.__name__} missing from errors.py's tree"


def test_builtin_bases_are_kept_for_code_that_catches_them() -> None:
    assert issubclass(InvalidName, ValueError)
    assert issubclass(InvalidHandler, TypeError)
    assert issubclass(ConfigConflict, RuntimeError)
    assert issubclass(PublishError, RuntimeError) and issubclass(NoStream, PublishError)
    assert issubclass(ConnectionFailed, ConnectionError)
    assert issubclass(AuthorizationFailed, ConnectionRefusedError)
    for cls in (BadRequest, NotFound, DeadlineExceeded, RemoteError, NoResponders):
        assert issubclass(cls, ServiceError)
    assert issubclass(Reject, MeshError) and issubclass(PermissionDenied, MeshError)


def test_wire_errors_are_read_in_one_module() -> None:
    """The mapping functions exist once, in transport/wire_errors.py."""
    mappers = {"status_error", "publish_error", "pub_ack_error", "service_error", "mesh_error"}
    where: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in mappers | {"_ack_error"}:
                where.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    assert where == {name: ["transport/wire_errors.py"] for name in mappers}


def _nats_errors() -> tuple[type[BaseException], ...]:
    return (nats.errors.Error, nats.js.errors.Error)


async def test_a_closed_client_raises_client_closed(nats_url: str) -> None:
    client = await connect(nats_url)
    await client.close()
    assert client.is_closed
    attempts = {
        "call": lambda: client.call("svc.echo", Ping(1)),
        "publish": lambda: client.publish("thing.happened.v1", Ping(1)),
        "ping": lambda: client.ping(),
        "info": lambda: client.info(),
        "stats": lambda: client.stats(),
        "list_dead_letters": lambda: list_dead_letters(client),
        "get_dead_letter": lambda: get_dead_letter(client, 1),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ClientClosed, match="closed") as caught:
            await attempt()
        assert not isinstance(caught.value, _nats_errors()), what
    with pytest.raises(ClientClosed):
        client.batch()


async def test_a_batch_of_a_closed_client_raises_client_closed(nats_url: str) -> None:
    async with connect(nats_url) as client:
        batch = client.batch()
    with pytest.raises(ClientClosed):
        await batch.publish("thing.happened.v1", Ping(1))


async def test_a_handler_context_after_close_raises_client_closed(serve, nats_url: str) -> None:
    svc = Service("closing")
    kept: list[Context] = []

    @svc.rpc()
    async def keep(ctx: Context) -> None:
        kept.append(ctx)

    client = await connect(nats_url)
    await serve(svc)
    await client.call("closing.keep")
    await client.close()
    await kept[0].client.close()  # the service's own connection, closed under it
    with pytest.raises(ClientClosed):
        await kept[0].call("closing.keep")
    with pytest.raises(ClientClosed):
        await kept[0].publish("thing.happened.v1", Ping(1))


async def test_a_stream_the_server_refuses_is_a_framework_error(nats_url: str) -> None:
    """Three replicas on a single server: JetStream refuses, serve() says why."""
    svc = Service("r3", streams=[Stream("R3", ["r3.>"], replicas=3)])
    with pytest.raises(JetStreamError, match=r"(?i)replicas") as caught:
        async with svc.serve(nats_url):
            pass
    assert isinstance(caught.value, MeshError)
    assert caught.value.err_code is not None  # JetStream's own number, kept
    assert "preparing service r3" in str(caught.value)
