"""Shared type aliases and protocols, so layers agree on shapes without importing each other.

Lower layers (`rpc/`, `events/`, `jobs/`, `context`) type the client they are given as
`ClientLike`, a Protocol of what they use, instead of importing `framework.client`
(which sits above them) at runtime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg

if TYPE_CHECKING:
    from .transport.mux import Mux

__all__ = [
    "ClientLike",
    "HandlerFunction",
    "Headers",
    "MessageCallback",
    "Msg",
    "NatsConnection",
]

# -- archcore: messages, handlers, the client protocol --------------------------------

# `Msg`: a message as nats-py delivers it (`subject`, `data`, `headers`, `reply`).
# `NatsConnection`: nats-py's connection, what `Client.nc` returns.

Headers: TypeAlias = Mapping[str, str]
"""Message headers as read; builders use a plain `dict[str, str]`."""

HandlerFunction: TypeAlias = Callable[..., Awaitable[Any]]
"""A user's decorated `async def`: takes a payload and/or a `Context`, returns the reply."""

MessageCallback: TypeAlias = Callable[[Msg], Awaitable[None]]
"""What a nats-py subscription calls for every message (a worker pool's `submit`)."""


class ClientLike(Protocol):
    """What the layers below `framework.client` use of a `Client`."""

    name: str | None

    @property
    def nc(self) -> NatsConnection:
        """The nats-py connection."""
        ...

    @property
    def js(self) -> Any:
        """nats-py's JetStream context of the connection."""
        ...

    async def mux(self) -> Mux:
        """The connection's shared request inbox."""
        ...

    async def refusable(self, subject: str, operation: Awaitable[Any]) -> Any:
        """`operation`, ended with `PermissionDenied` when the server refuses it."""
        ...

    def check_open(self) -> None:
        """Raise `ClientClosed` when the client was closed."""
        ...


# -- end of archcore's block -----------------------------------------------------------
