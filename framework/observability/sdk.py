"""OpenTelemetry SDK set-up, on request of the environment: console trees, a trace file, OTLP.

The SDK is a dev dependency only; everything here imports it lazily and says so
(a warning, not a crash) when it is missing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from opentelemetry import trace

from .conventions import ENABLED, flag
from .logging import get_logger

__all__ = ["configure_telemetry"]

_log = get_logger("framework.observability.sdk")

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
    console = flag("MESH_TRACE_CONSOLE", False)
    trace_file = os.environ.get("MESH_TRACE_FILE", "")
    otlp = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not (console or otlp or trace_file):
        return False
    if _configured:
        return True
    if not _may_install():
        return False
    provider = _provider(service_name)
    if provider is None:
        return False
    if console:
        from .console_traces import TraceTreePrinter

        provider.add_span_processor(
            TraceTreePrinter(stream=stream if stream is not None else sys.stderr)
        )
    if trace_file:
        _add_trace_file(provider, trace_file)
    if otlp:
        _add_otlp(provider, provider.resource)
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def _may_install() -> bool:
    """Tracing is on, and nobody else installed a tracer provider."""
    if not ENABLED:
        _log.warning("MESH_TRACING=0: tracing stays off despite the exporter settings")
        return False
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        _log.info("a tracer provider is already installed; leaving it as it is")
        return False
    return True


def _provider(service_name: str | None) -> Any:
    """An SDK TracerProvider named after the service, or None without the SDK."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        _log.warning(
            "tracing requested but opentelemetry-sdk is not installed; continuing without",
            hint="pip install opentelemetry-sdk",
        )
        return None
    attributes = {}
    if service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    return TracerProvider(resource=Resource.create(attributes))


def _add_trace_file(provider: Any, path: str) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from .trace_file import SpanFileExporter

    provider.add_span_processor(
        BatchSpanProcessor(SpanFileExporter(path), schedule_delay_millis=200)
    )


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
