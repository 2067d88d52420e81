"""W3C trace context in headers, read and written without the propagator machinery.

A message that carries `traceparent` is traced by whoever sent it, so the framework
passes the trace on even without an SDK: the handler's span is the arriving context
(a non-recording span) and every call or event it sends carries it onward. Through
OpenTelemetry's API that is a global propagator's `extract` (a regex, a `Context`,
`set_span_in_context`) and `inject` (a composite of two propagators, a second
`Context`, the baggage lookup): 13 us per hop, measured, where the message itself costs
about 30. With the default propagators (W3C trace context and baggage, which is what
`OTEL_PROPAGATORS` selects when unset) the same header is parsed and formatted here,
with the propagator's own pattern and rules; any other propagator configuration, and
any baggage to send, takes the API's way.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import baggage, propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH, TraceState

__all__ = ["default_propagation", "inject", "remote_span"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_PATTERN = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_MAX_TRACEPARENT = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_DEFAULT_KINDS = (TraceContextTextMapPropagator, W3CBaggagePropagator)
_checked: tuple[object, bool] = (None, False)  # the global propagator last looked at


def default_propagation() -> bool:
    """Whether the global propagator is W3C trace context (and baggage) only."""
    global _checked
    current = propagate.get_global_textmap()
    seen, default = _checked
    if current is not seen:
        parts = getattr(current, "_propagators", None)
        default = (
            type(current) is CompositePropagator
            and isinstance(parts, list)
            and any(type(p) is TraceContextTextMapPropagator for p in parts)
            and all(type(p) in _DEFAULT_KINDS for p in parts)
        )
        _checked = (current, default)
    return default


_spans: dict[tuple[str, str | None], Span] = {}  # recent arrivals, parsed
_MAX_SPANS = 1024


def remote_span(headers: Mapping[str, str]) -> Span:
    """The arriving trace as a non-recording span, as `propagate.extract` and a no-op
    tracer make it (`INVALID_SPAN` for a missing or malformed `traceparent`).

    Without an SDK a trace's context is passed on unchanged, so every hop of one
    conversation carries the same header: the last `_MAX_SPANS` are kept parsed (a
    non-recording span holds nothing but its context, so one serves them all)."""
    header = headers.get(TRACEPARENT)
    if not header:
        return INVALID_SPAN
    key = (header, headers.get(TRACESTATE))
    span = _spans.get(key)
    if span is None:
        span = _parse(header, key[1])
        if len(_spans) >= _MAX_SPANS:
            _spans.clear()
        _spans[key] = span
    return span


def _parse(header: str, state: str | None) -> Span:
    if len(header) > _MAX_TRACEPARENT:
        return INVALID_SPAN
    match = _PATTERN.search(header)
    if not match:
        return INVALID_SPAN
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or version == "ff":
        return INVALID_SPAN
    if version == "00" and rest:
        return INVALID_SPAN
    trace_state = None
    if state is not None and len(state) <= _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH:
        trace_state = TraceState.from_header([state])
    return NonRecordingSpan(
        SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(int(flags, 16)),
            trace_state=trace_state,
        )
    )


def inject(headers: MutableMapping[str, str], span_context: SpanContext) -> bool:
    """`traceparent` (and `tracestate`) of a valid context, as the W3C propagator
    writes them; False (nothing written) when there is baggage to send as well."""
    if baggage.get_all():
        return False
    headers[TRACEPARENT] = (
        f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}"
        f"-{span_context.trace_flags:02x}"
    )
    if span_context.trace_state:
        headers[TRACESTATE] = span_context.trace_state.to_header()
    return True
