"""What a handler takes and returns, read once from its annotations when decorated."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidHandler
from ..types import HandlerFunction as Handler
from .codec import decoder_for

__all__ = ["NO_PAYLOAD", "Handler", "HandlerSignature", "read_signature"]


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
    """Fail at decoration time, not on the first message, if the handler is unusable.

    A handler takes at most one payload (annotated with its type, e.g. a
    `msgspec.Struct`) and optionally a context (annotated with `context_type`), in
    either order; its return annotation is the reply type.
    """
    if not inspect.iscoroutinefunction(fn):
        raise InvalidHandler(f"handler {fn.__qualname__} must be an async function")
    hints = _hints(fn)
    payload_type: Any = NO_PAYLOAD
    wants_context = context_first = False
    for index, param in enumerate(inspect.signature(fn).parameters.values()):
        hint = hints.get(param.name, _MISSING)
        if hint is _MISSING:
            raise InvalidHandler(_unannotated(fn, param.name, context_type))
        if hint is context_type:
            wants_context = True
            context_first = index == 0
        elif payload_type is NO_PAYLOAD:
            payload_type = hint
        else:
            raise InvalidHandler(
                f"handler {fn.__qualname__} takes one payload and optionally a "
                f"{context_type.__name__}; extra parameter {param.name!r}"
            )
    returns = hints.get("return", Any)
    if returns is type(None):
        returns = None
    if payload_type is not NO_PAYLOAD:
        _check_decodable(fn, payload_type)
    return HandlerSignature(payload_type, returns, wants_context, context_first)


_MISSING: Any = object()


def _hints(fn: Handler) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except NameError as exc:  # a forward reference the handler's module cannot resolve
        raise InvalidHandler(
            f"handler {fn.__qualname__}: cannot resolve its annotations ({exc}); import "
            "the payload type and Context at module level"
        ) from None


def _unannotated(fn: Handler, name: str, context_type: type) -> str:
    context = context_type.__name__
    return (
        f"handler {fn.__qualname__}: parameter {name!r} has no annotation; annotate the "
        f"payload with its type and the context with {context}, e.g. "
        f"`async def {fn.__name__}(req: MyRequest, ctx: {context}) -> MyReply` "
        f"(from framework import {context}; MyRequest a msgspec.Struct)"
    )


def _check_decodable(fn: Handler, payload_type: Any) -> None:
    try:
        decoder_for(payload_type)
    except TypeError as exc:
        raise InvalidHandler(
            f"handler {fn.__qualname__}: msgspec cannot decode its payload type "
            f"{payload_type!r} ({exc})"
        ) from None
