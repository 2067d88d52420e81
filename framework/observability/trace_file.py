"""Spans of several processes in one JSON-lines file, so one trace can be shown whole.

`mesh up` gives its services `MESH_TRACE_FILE=.mesh/traces.jsonl`; `mesh demo` reads
the file back and prints the trace of an order across the order, payment and
notification services. Writing happens on the SDK's batch thread, never on the event
loop; the file is started afresh when it passes a size limit. Needs the SDK (dev only).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from .conventions import DELIVERY_ATTEMPT, SERVICE

__all__ = ["SpanFileExporter", "read_trace"]

MAX_BYTES = 20 * 1024 * 1024


def _record(span: ReadableSpan) -> dict[str, object]:
    attributes = span.attributes or {}
    service = attributes.get(SERVICE)
    if service is None and span.resource is not None:
        service = span.resource.attributes.get("service.name")
    parent = span.parent
    return {
        "trace": f"{span.context.trace_id:032x}",
        "span": f"{span.context.span_id:016x}",
        "parent": f"{parent.span_id:016x}" if parent is not None else None,
        "remote": bool(parent is not None and parent.is_remote),
        "name": span.name,
        "kind": span.kind.value,
        "start": span.start_time,
        "end": span.end_time,
        "error": span.status.description or "error"
        if span.status.status_code is StatusCode.ERROR
        else None,
        "service": str(service) if service is not None else None,
        "attempt": attributes.get(DELIVERY_ATTEMPT),
    }


class SpanFileExporter(SpanExporter):
    """Appends one JSON line per span; several processes may share the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_record(span), separators=(",", ":")) + "\n" for span in spans)
        try:
            with self._lock:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                if self._path.exists() and self._path.stat().st_size > MAX_BYTES:
                    self._path.write_text("")
                with self._path.open("a", encoding="utf-8") as out:
                    out.write(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _span(record: dict[str, object]) -> ReadableSpan:
    def context(span_id: object, remote: bool) -> SpanContext:
        return SpanContext(
            int(str(record["trace"]), 16),
            int(str(span_id), 16),
            is_remote=remote,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )

    parent = record.get("parent")
    error = record.get("error")
    attributes: dict[str, str | int] = {}
    if record.get("service"):
        attributes[SERVICE] = str(record["service"])
    if isinstance(record.get("attempt"), int):
        attributes[DELIVERY_ATTEMPT] = int(record["attempt"])  # type: ignore[call-overload]
    return ReadableSpan(
        name=str(record["name"]),
        context=context(record["span"], False),
        parent=context(parent, bool(record.get("remote"))) if parent else None,
        kind=SpanKind(int(record["kind"])),  # type: ignore[call-overload]
        attributes=attributes,
        start_time=int(record["start"]),  # type: ignore[call-overload]
        end_time=int(record["end"]),  # type: ignore[call-overload]
        status=Status(StatusCode.ERROR, str(error)) if error else Status(StatusCode.UNSET),
        resource=Resource.create({}),
    )


def read_trace(path: str | os.PathLike[str], trace_id: str) -> list[ReadableSpan]:
    """Every span of one trace found in the file, from whichever process wrote it."""
    spans: list[ReadableSpan] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return spans
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a concurrent writer
        if record.get("trace") == trace_id:
            spans.append(_span(record))
    return spans
