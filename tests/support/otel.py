"""Finished spans recorded in memory, on the process's OpenTelemetry SDK provider."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def sdk_provider() -> TracerProvider:
    """The global SDK `TracerProvider`, installed first if there is none yet.

    A provider can be set only once per process: every test module shares it and adds
    its own span processors.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    return provider


@contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished inside the block, kept in memory; dropped after it (the
    exporter is shut down, so later spans are not kept for nothing)."""
    exporter = InMemorySpanExporter()
    sdk_provider().add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()
