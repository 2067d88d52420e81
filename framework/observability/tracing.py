"""Tracing through opentelemetry-api only: without an SDK every call here is (almost) free.

Spans follow the OpenTelemetry messaging conventions: named `{messaging.operation.name}
{destination}`, with `messaging.system = "nats"`.

| operation       | kind     | span name                    | messaging.operation.type |
| --------------- | -------- | ---------------------------- | ------------------------ |
| `call`          | CLIENT   | `request <service>.<name>`   | `send`                   |
| RPC handler     | SERVER   | `process <service>.<name>`   | `process`                |
| `publish`       | PRODUCER | `publish events.<type>`      | `send`                   |
| event handler   | CONSUMER | `process events.<type>`      | `process`                |

A handler's span is a child of the `traceparent` that arrived (or a new root) and is the
*current* span while the handler runs, so user spans and `ctx.call`/`ctx.publish` nest
under it. An event's process span also links to the producer's span, so each delivery
attempt is its own span pointing at the same origin. Trace context crosses the wire in
W3C `traceparent`/`tracestate` headers, written only when there is a trace to continue
(a valid span context; never with no SDK and no incoming trace).

`MESH_TRACING=0` bypasses all of it without touching the OpenTelemetry API.
`configure_telemetry()` (in `sdk`, re-exported here) installs the SDK for humans
(`MESH_TRACE_CONSOLE=1`) and for collectors (`OTEL_EXPORTER_OTLP_ENDPOINT`); the SDK
itself stays an optional import. Attribute names shared with the SDK-side modules live
in `conventions`, which imports nothing of ours: no module here imports its importers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode

from ..transport.headers import TRACEPARENT
from .conventions import (
    CONVERSATION_ID,
    DELIVERY_ATTEMPT,
    ENABLED,
    MESSAGE_ID,
    SERVICE,
    STREAM_SEQUENCE,
    SYSTEM,
)
from .sdk import configure_telemetry

__all__ = [
    "CONVERSATION_ID",
    "DELIVERY_ATTEMPT",
    "ENABLED",
    "MESSAGE_ID",
    "SERVICE",
    "STREAM_SEQUENCE",
    "SYSTEM",
    "SpanKind",
    "activate",
    "configure_telemetry",
    "deactivate",
    "handler_attributes",
    "inject_context",
    "log_ids",
    "record_error",
    "send_target",
    "start_handler_span",
    "start_send_span",
]


# A ProxyTracer: it follows a TracerProvider installed after this import.
_tracer = trace.get_tracer("framework")
# Handlers start from an empty context: a service started inside some span must not
# make every request it handles a child of that span.
_ROOT: Final = otel_context.Context()


# -- attributes (built once per endpoint or destination, not per message) ---------------


def handler_attributes(service: str, subject: str, group: str) -> dict[str, Any]:
    """What a SERVER or CONSUMER span of one handler carries from its start."""
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": subject,
        "messaging.consumer.group.name": group,
        SERVICE: service,
    }


_send_targets: dict[tuple[str, str, str | None], tuple[str, dict[str, Any]]] = {}
_MAX_TARGETS = 4096


def send_target(operation: str, subject: str, service: str | None) -> tuple[str, dict[str, Any]]:
    """Span name and start attributes of a `request` or `publish` to `subject`, cached.

    Reply inboxes and other `_INBOX.` subjects are temporary and anonymous: they are left
    out of the name and of `messaging.destination.name` (unbounded cardinality).
    """
    key = (operation, subject, service)
    target = _send_targets.get(key)
    if target is not None:
        return target
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "send",
        "messaging.operation.name": operation,
    }
    if subject.startswith("_INBOX."):
        name = operation
        attributes["messaging.destination.temporary"] = True
        attributes["messaging.destination.anonymous"] = True
    else:
        name = f"{operation} {subject}"
        attributes["messaging.destination.name"] = subject
    if service:
        attributes[SERVICE] = service
    target = (name, attributes)
    if len(_send_targets) < _MAX_TARGETS:
        _send_targets[key] = target
    return target


# -- spans -------------------------------------------------------------------------------


def start_handler_span(
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    headers: Mapping[str, str] | None,
    *,
    link_to_parent: bool = False,
) -> Span:
    """A SERVER or CONSUMER span: child of the trace that arrived in `headers`, else a root.

    With `link_to_parent` (event consumers) the span also links to the producer's span,
    per the messaging conventions: redeliveries are separate spans with the same link.
    """
    incoming = bool(headers) and TRACEPARENT in headers  # type: ignore[operator]
    if not ENABLED or (not incoming and _no_sdk()):
        return INVALID_SPAN  # nothing to record and nothing to pass on: skip the API
    parent = _ROOT
    links: tuple[Link, ...] | None = None
    if incoming:
        parent = propagate.extract(headers, context=_ROOT)
        if link_to_parent:
            producer = trace.get_current_span(parent).get_span_context()
            if producer.is_valid:
                links = (Link(producer),)
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes, links=links)


_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def _no_sdk() -> bool:
    """No tracer provider installed: every span would be a no-op.

    While none is installed, `trace.get_tracer_provider()` looks the environment up on
    every call (1 us, paid on every message); the API's global is read directly instead,
    unless a provider is named in the environment (then the API loads it on first use).
    """
    if _PROVIDER_FROM_ENV or not hasattr(trace, "_TRACER_PROVIDER"):
        return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    provider = trace._TRACER_PROVIDER
    return provider is None or isinstance(provider, trace.ProxyTracerProvider)


def start_send_span(
    operation: str,
    subject: str,
    service: str | None,
    kind: SpanKind,
    parent_span: Span | None = None,
) -> Span:
    """A CLIENT or PRODUCER span of a `request` or `publish` to `subject`: child of the
    current span.

    `parent_span` (a handler's span, from `ctx.call`/`ctx.publish`) is the parent only
    when no span is current, e.g. when the context is used from a task started elsewhere.
    Without a trace to continue and without an SDK nothing is built: the span name and
    attributes are looked up only for a span that will exist.
    """
    if not ENABLED:
        return INVALID_SPAN
    current_valid = trace.get_current_span().get_span_context().is_valid
    parent_valid = parent_span is not None and parent_span.get_span_context().is_valid
    if not current_valid and not parent_valid and _no_sdk():
        return INVALID_SPAN  # no trace to continue and nothing to record
    context = None
    if parent_valid and not current_valid:
        context = trace.set_span_in_context(parent_span)  # type: ignore[arg-type]
    name, attributes = send_target(operation, subject, service)
    return _tracer.start_span(name, context=context, kind=kind, attributes=attributes)


def activate(span: Span) -> object | None:
    """Make `span` the current span (for the handler it wraps); undo with `deactivate`.

    Nothing to do for an invalid span (no SDK, no incoming trace, or MESH_TRACING=0).
    """
    if not span.get_span_context().is_valid:
        return None
    return otel_context.attach(trace.set_span_in_context(span))


def deactivate(token: object | None) -> None:
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


def inject_context(headers: MutableMapping[str, str], span: Span) -> None:
    """`traceparent`/`tracestate` only when there is a trace to continue.

    A valid span context is one an SDK created (recording, or sampled out: then the
    sampled flag tells the next service not to record either) or one that arrived.
    With no SDK and no incoming trace no bytes are spent.
    """
    if span.get_span_context().is_valid:
        propagate.inject(headers, context=trace.set_span_in_context(span))


def record_error(span: Span, error: BaseException, *, status: bool = True) -> None:
    """`error.type` always; ERROR status and the exception event unless `status=False`.

    Server spans of RPC errors a caller caused (4xx) pass `status=False`, as HTTP and
    RPC conventions do: the caller's CLIENT span carries the error.
    """
    if not span.is_recording():
        return
    code = getattr(error, "code", None)
    span.set_attribute("error.type", type(error).__qualname__)
    if isinstance(code, int):
        span.set_attribute("mesh.error.code", code)
    if status:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def log_ids(span: Span) -> dict[str, str]:
    """`trace_id` and `span_id` (hex, as exporters show them), or nothing."""
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return {}
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "span_id": format(span_context.span_id, "016x"),
    }
