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
`configure_telemetry()` installs the SDK for humans (`MESH_TRACE_CONSOLE=1`) and for
collectors (`OTEL_EXPORTER_OTLP_ENDPOINT`); the SDK itself stays an optional import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode

from ..transport.headers import TRACEPARENT

__all__ = [
    "CONVERSATION_ID",
    "DELIVERY_ATTEMPT",
    "ENABLED",
    "MESSAGE_ID",
    "SERVICE",
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

_log = structlog.get_logger("framework.observability.tracing")


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


ENABLED: Final = _flag("MESH_TRACING", True)
"""False when `MESH_TRACING=0`: spans are INVALID_SPAN, nothing reaches the API."""

SYSTEM = "nats"
SERVICE = "mesh.service"  # the framework service a span belongs to (one process may run several)
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
DELIVERY_ATTEMPT = "messaging.nats.message.delivery_attempt"
STREAM_SEQUENCE = "messaging.nats.message.stream_sequence"

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


# -- SDK set-up (optional) -------------------------------------------------------------

_configured = False


def configure_telemetry(service_name: str | None = None, *, stream: Any = None) -> bool:
    """Install the OpenTelemetry SDK when asked to by the environment; True if installed.

    - `MESH_TRACE_CONSOLE=1`: print every finished trace as an indented tree (stderr,
      or `stream`).
    - `MESH_TRACE_FILE=path`: append finished spans to a JSON-lines file shared by the
      processes of a local mesh (what `mesh demo` reads to show one trace whole).
    - `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`): export spans, and metrics,
      over OTLP when `opentelemetry-exporter-otlp` is installed (`OTEL_EXPORTER_OTLP_PROTOCOL`
      picks `grpc` or `http/protobuf`).

    The SDK is a dev dependency only: when it is missing this logs a warning and returns
    False. A TracerProvider someone else installed is left alone. Runs once per process.
    """
    global _configured
    console = _flag("MESH_TRACE_CONSOLE", False)
    trace_file = os.environ.get("MESH_TRACE_FILE", "")
    otlp = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not (console or otlp or trace_file):
        return False
    if _configured:
        return True
    if not ENABLED:
        _log.warning("MESH_TRACING=0: tracing stays off despite the exporter settings")
        return False
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _log.info("a tracer provider is already installed; leaving it as it is")
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        _log.warning(
            "tracing requested but opentelemetry-sdk is not installed; continuing without",
            hint="pip install opentelemetry-sdk",
        )
        return False

    attributes = {}
    if service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    resource = Resource.create(attributes)
    provider = TracerProvider(resource=resource)
    if console:
        from .console_traces import TraceTreePrinter

        provider.add_span_processor(
            TraceTreePrinter(stream=stream if stream is not None else sys.stderr)
        )
    if trace_file:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from .trace_file import SpanFileExporter

        provider.add_span_processor(
            BatchSpanProcessor(SpanFileExporter(trace_file), schedule_delay_millis=200)
        )
    if otlp:
        _add_otlp(provider, resource)
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def _otlp_module(kind: str) -> Any:
    """The OTLP exporter module for `kind` ("trace" or "metric"), or None."""
    import importlib

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip().lower()
    transports = ["grpc", "http"] if protocol == "grpc" else ["http", "grpc"]
    for transport in transports:
        name = f"opentelemetry.exporter.otlp.proto.{transport}.{kind}_exporter"
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _add_otlp(provider: Any, resource: Any) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    traces = _otlp_module("trace")
    if traces is None:
        _log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not "
            "installed; spans are not exported",
            hint="pip install opentelemetry-exporter-otlp",
        )
        return
    provider.add_span_processor(BatchSpanProcessor(traces.OTLPSpanExporter()))
    metric_exports = _otlp_module("metric")
    if metric_exports is None:
        return
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if isinstance(metrics.get_meter_provider(), metrics.NoOpMeterProvider | MeterProvider):
        return  # someone installed one already
    reader = PeriodicExportingMetricReader(metric_exports.OTLPMetricExporter())
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
