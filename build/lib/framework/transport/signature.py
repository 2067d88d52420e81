"""What a handler takes and returns, read once from its annotations when decorated."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .codec import decoder_for

__all__ = ["NO_PAYLOAD", "HandlerSignature", "read_signature"]

Handler = Callable[..., Awaitable[Any]]


class _NoPayload:
    def __repr__(self) -> str:
        return "NO_PAYLOAD"


NO_PAYLOAD: Any = _NoPayload()


@dataclass(frozen=True, slots=True)
class HandlerSignature:
    """How to call a handler: which argument is the payload, which the context."""

    payload_type: Any  # NO_PAYLOAD when the handler takes no payload
    returns: Any
    wants_context: bool
    context_first: bool

    def invoke(self, fn: Handler, payload: Any, ctx: Any) -> Awaitable[Any]:
        if self.payload_type is NO_PAYLOAD:
            return fn(ctx) if self.wants_context else fn()
        if not self.wants_context:
            return fn(payload)
        return fn(ctx, payload) if self.context_first else fn(payload, ctx)


def read_signature(fn: Handler, context_type: type) -> HandlerSignature:
    """Fail at decoration time, not on the first message, if the handler is unusable."""
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"handler {fn.__qualname__} must be an async function")
    hints = typing.get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    payload_type: Any = NO_PAYLOAD
    wants_context = context_first = False
    for index, param in enumerate(params):
        hint = hints.get(param.name, Any)
        if hint is context_type:
            wants_context = True
            context_first = index == 0
        elif payload_type is NO_PAYLOAD:
            payload_type = hint
        else:
            raise TypeError(
                f"handler {fn.__qualname__} takes one payload and optionally a Context; "
                f"extra parameter {param.name!r}"
            )
    returns = hints.get("return", Any)
    if returns is type(None):
        returns = None
    if payload_type is not NO_PAYLOAD:
        decoder_for(payload_type)  # raises TypeError now for types msgspec cannot decode
    return HandlerSignature(payload_type, returns, wants_context, context_first)
