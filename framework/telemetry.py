"""Tracing through opentelemetry-api only: without an SDK every call here is a no-op.

Span names and attributes follow the OpenTelemetry messaging conventions
(`{operation} {destination}`, `messaging.system = "nats"`). Trace context crosses the
wire in W3C `traceparent`/`tracestate` headers, injected only when a span records.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from .headers import TRACEPARENT

__all__ = [
    "SpanKind",
    "end_span",
    "extract_context",
    "inject_context",
    "links_to",
    "record_error",
    "start_span",
]

_tracer = trace.get_tracer("framework")


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    """The remote parent, read only when a traceparent arrived (cheap when it did not)."""
    if not headers or TRACEPARENT not in headers:
        return None
    return propagate.extract(headers)


def start_span(
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, Any],
    *,
    parent: otel_context.Context | None = None,
    parent_span: Span | None = None,
    links: Sequence[Link] = (),
) -> Span:
    if parent is None and parent_span is not None and parent_span.get_span_context().is_valid:
        parent = trace.set_span_in_context(parent_span)
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes, links=links)


def inject_context(headers: MutableMapping[str, str], span: Span) -> None:
    """Only a recording span is worth the bytes of a traceparent header."""
    if span.is_recording():
        propagate.inject(headers, context=trace.set_span_in_context(span))


def record_error(span: Span, error: BaseException, description: str | None = None) -> None:
    if span.is_recording():
        span.record_exception(error)
        span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR, description or str(error)))


def end_span(span: Span) -> None:
    span.end()


def links_to(parent: otel_context.Context | None) -> list[Link]:
    """A consumer span links to its producer, so each redelivery shows its origin."""
    if parent is None:
        return []
    span_context = trace.get_current_span(parent).get_span_context()
    return [Link(span_context)] if span_context.is_valid else []
