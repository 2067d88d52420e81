"""Trace context passed on without an SDK: what OpenTelemetry's propagators would do.

`framework.observability.w3c` reads and writes `traceparent`/`tracestate` directly
when the global propagator is the default one; the result must be the API's own, for
good and for malformed headers, and baggage must still reach the wire.
"""

from __future__ import annotations

import random

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from framework.observability import tracing, w3c

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACEPARENTS = [
    GOOD,
    " " + GOOD,
    GOOD + " ",
    GOOD + "\t",
    GOOD + "-extra",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    "",
    "garbage",
    GOOD + "-" + "x" * 600,
]
TRACESTATES = [None, "", "congo=t61rcWkgMzE", "a=1,b=2", "bad state", "k=" + "v" * 600, "a=1,a=2"]


def api_span(headers: dict[str, str]) -> trace.Span:
    """What the API makes of `headers` with no SDK: extract, then a no-op tracer's span."""
    parent = propagate.extract(headers, context=otel_context.Context())
    return trace.NoOpTracer().start_span("x", context=parent)


def test_arriving_trace_context_is_read_as_the_api_reads_it() -> None:
    assert w3c.default_propagation()
    rng = random.Random(3)
    cases = [(tp, ts) for tp in TRACEPARENTS for ts in TRACESTATES]
    for _ in range(300):  # and random mutations of a good one
        chars = list(GOOD)
        chars[rng.randrange(len(chars))] = rng.choice("0af-x ")
        cases.append(("".join(chars), rng.choice(TRACESTATES)))
    for traceparent, tracestate in cases:
        headers = {"traceparent": traceparent}
        if tracestate is not None:
            headers["tracestate"] = tracestate
        ours = w3c.remote_span(headers).get_span_context()
        theirs = api_span(headers).get_span_context()
        assert ours == theirs, headers
        assert ours.trace_state == theirs.trace_state, headers


def test_trace_context_is_written_as_the_api_writes_it() -> None:
    for tracestate in TRACESTATES:
        headers = {"traceparent": GOOD}
        if tracestate is not None:
            headers["tracestate"] = tracestate
        span = api_span(headers)
        if not span.get_span_context().is_valid:
            continue
        ours: dict[str, str] = {}
        tracing.inject_context(ours, span)
        theirs: dict[str, str] = {}
        propagate.inject(theirs, context=trace.set_span_in_context(span))
        assert ours == theirs


def test_baggage_still_goes_out_with_the_trace() -> None:
    span = api_span({"traceparent": GOOD})
    token = otel_context.attach(baggage.set_baggage("tenant", "t1"))
    try:
        out: dict[str, str] = {}
        tracing.inject_context(out, span)
    finally:
        otel_context.detach(token)
    assert out == {"traceparent": GOOD, "baggage": "tenant=t1"}


def test_other_propagators_are_left_to_the_api() -> None:
    default = propagate.get_global_textmap()

    class Tagging(TraceContextTextMapPropagator):
        def inject(self, carrier, context=None, setter=None):  # type: ignore[no-untyped-def]
            carrier["x-custom"] = "1"

    propagate.set_global_textmap(CompositePropagator([Tagging()]))
    try:
        assert not w3c.default_propagation()
        out: dict[str, str] = {}
        tracing.inject_context(out, api_span({"traceparent": GOOD}))
        assert out == {"x-custom": "1"}
    finally:
        propagate.set_global_textmap(default)
    assert w3c.default_propagation()
