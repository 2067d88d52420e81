"""Finished traces printed as indented trees, for people watching a local mesh.

Installed by `configure_telemetry()` when `MESH_TRACE_CONSOLE=1`. Needs the
OpenTelemetry SDK (a dev dependency), so only that function imports this module.

A trace is printed once none of its spans that started in this process is still open,
that is when its local root ends (a request's server span, or the client span of the
script that started it). Work that starts later in the same trace, typically an event
consumed after the request that published it was answered, is printed the same way
when it finishes, marked as a continuation of the span it hangs under:

    trace 6ce3362fffed1fcf6e3afee03ba1f975  (6 spans, 12.5 ms)
      request orders.create                     CLIENT    web         10.4 ms
      └─ process orders.create                  SERVER    orders       2.8 ms
         └─ publish events.order.created.v1     PRODUCER  orders       2.0 ms
            └─ process events.order.created.v1  CONSUMER  payments     2.4 ms  ✗ ConnectionError: ...
               └─ request fraud.score           CLIENT    payments     0.8 ms
                  └─ process fraud.score        SERVER    fraud        0.1 ms
    trace 6ce3362fffed1fcf6e3afee03ba1f975  (3 spans, 4.6 ms)
      ↳ continues under publish events.order.created.v1
      process events.order.created.v1  CONSUMER  payments     4.6 ms  attempt 2
      └─ request fraud.score           CLIENT    payments     1.5 ms
         └─ process fraud.score        SERVER    fraud        0.1 ms
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import IO, Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import StatusCode

from .conventions import DELIVERY_ATTEMPT, SERVICE

__all__ = ["TraceTreePrinter", "render_trace"]

_KIND = {0: "INTERNAL", 1: "SERVER", 2: "CLIENT", 3: "PRODUCER", 4: "CONSUMER"}


class _Glyphs:
    def __init__(self, unicode: bool) -> None:
        if unicode:
            self.tee, self.last, self.pipe, self.gap = "├─ ", "└─ ", "│  ", "   "
            self.error, self.arrow = "✗", "↳"
        else:
            self.tee, self.last, self.pipe, self.gap = "|- ", "`- ", "|  ", "   "
            self.error, self.arrow = "x", "->"


def _unicode_ok(stream: Any) -> bool:
    encoding = (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "")
    return encoding in ("utf8", "utf16", "utf32")


def _duration_ms(span: ReadableSpan) -> float:
    if span.start_time is None or span.end_time is None:
        return 0.0
    return (span.end_time - span.start_time) / 1e6


def _service(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    value = attributes.get(SERVICE)
    if value is None and span.resource is not None:
        value = span.resource.attributes.get("service.name")
    return str(value) if value is not None else "-"


def _error_note(span: ReadableSpan, glyph: str) -> str:
    if span.status.status_code is not StatusCode.ERROR:
        return ""
    description = (span.status.description or "error").replace("\n", " ")
    if len(description) > 80:
        description = description[:77] + "..."
    return f"  {glyph} {description}"


_Entry = str | tuple[str, ReadableSpan]  # a note line, or a row: (tree label, span)


def _start(span: ReadableSpan) -> int:
    return span.start_time or 0


def render_trace(
    spans: Sequence[ReadableSpan],
    *,
    continues: dict[int, str] | None = None,
    unicode: bool = True,
) -> str:
    """The spans of one trace (or of one part of it) as an indented tree.

    `continues` maps span ids printed earlier to their names, so that a part finished
    later says which span it hangs under.
    """
    if not spans:
        return ""
    glyphs = _Glyphs(unicode)
    entries = _tree(spans, continues or {}, glyphs)
    return _format(spans, entries, glyphs)


def _tree(
    spans: Sequence[ReadableSpan], continues: dict[int, str], glyphs: _Glyphs
) -> list[_Entry]:
    """Rows in tree order, each root preceded by a note of where it hangs, if elsewhere."""
    ids = {span.context.span_id for span in spans}
    children: dict[int, list[ReadableSpan]] = {}
    roots: list[ReadableSpan] = []
    for span in spans:
        if span.parent is not None and span.parent.span_id in ids:
            children.setdefault(span.parent.span_id, []).append(span)
        else:
            roots.append(span)
    entries: list[_Entry] = []

    def walk(span: ReadableSpan, prefix: str, branch: str, below_prefix: str) -> None:
        entries.append((prefix + branch + span.name, span))
        below = sorted(children.get(span.context.span_id, ()), key=_start)
        for index, child in enumerate(below):
            last = index == len(below) - 1
            walk(
                child,
                below_prefix,
                glyphs.last if last else glyphs.tee,
                below_prefix + (glyphs.gap if last else glyphs.pipe),
            )

    for root in sorted(roots, key=_start):
        parent = root.parent
        if parent is not None and parent.span_id in continues:
            entries.append(f"  {glyphs.arrow} continues under {continues[parent.span_id]}")
        elif parent is not None and parent.is_remote:
            entries.append(f"  {glyphs.arrow} called from {parent.span_id:016x} (another process)")
        walk(root, "  ", "", "  ")
    return entries


def _format(spans: Sequence[ReadableSpan], entries: list[_Entry], glyphs: _Glyphs) -> str:
    """A header line with the trace id, span count and duration, then aligned rows."""
    rows = [entry for entry in entries if isinstance(entry, tuple)]
    width = max(len(label) for label, _ in rows)
    service_width = max(len(_service(span)) for _, span in rows)
    first = min(_start(span) for span in spans)
    last = max(span.end_time or 0 for span in spans)
    count = len(spans)
    lines = [
        f"trace {spans[0].context.trace_id:032x}  "
        f"({count} span{'' if count == 1 else 's'}, {(last - first) / 1e6:.1f} ms)"
    ]
    for entry in entries:
        if isinstance(entry, str):
            lines.append(entry)
            continue
        label, span = entry
        attempt = (span.attributes or {}).get(DELIVERY_ATTEMPT)
        retry = f"  attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
        lines.append(
            f"{label.ljust(width)}  {_KIND.get(span.kind.value, '?'):<8}  "
            f"{_service(span):<{service_width}}  {_duration_ms(span):8.1f} ms"
            f"{retry}{_error_note(span, glyphs.error)}"
        )
    return "\n".join(lines) + "\n"


class TraceTreePrinter(SpanProcessor):
    """Collects finished spans per trace; prints a trace when no local span of it is open."""

    def __init__(self, stream: IO[str] | None = None, *, max_traces: int = 1000) -> None:
        self.stream: IO[str] = stream if stream is not None else sys.stderr
        self._max_traces = max_traces
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}
        self._ended: dict[int, list[ReadableSpan]] = {}
        self._printed: OrderedDict[int, None] = OrderedDict()  # span ids shown, newest last
        self._names: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        trace_id = span.context.trace_id
        evicted: list[list[ReadableSpan]] = []
        with self._lock:
            self._open[trace_id] = self._open.get(trace_id, 0) + 1
            while len(self._open) > self._max_traces:  # spans never ended: give up on them
                oldest = next(iter(self._open))
                del self._open[oldest]
                stale = self._ended.pop(oldest, None)
                if stale:
                    evicted.append(stale)
        for spans in evicted:
            self._print(spans)

    def on_end(self, span: ReadableSpan) -> None:
        trace_id = span.context.trace_id
        with self._lock:
            self._ended.setdefault(trace_id, []).append(span)
            open_spans = self._open.get(trace_id, 1) - 1
            if open_spans > 0:
                self._open[trace_id] = open_spans
                return
            self._open.pop(trace_id, None)
            spans = self._ended.pop(trace_id)
        self._print(spans)

    def _print(self, spans: list[ReadableSpan]) -> None:
        with self._lock:
            continues = {
                span.parent.span_id: self._names[span.parent.span_id]
                for span in spans
                if span.parent is not None and span.parent.span_id in self._names
            }
            for span in spans:
                self._remember(span)
        text = render_trace(spans, continues=continues, unicode=_unicode_ok(self.stream))
        with self._lock:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # closed stream at exit: nothing to do
                pass

    def _remember(self, span: ReadableSpan) -> None:
        span_id = span.context.span_id
        self._printed[span_id] = None
        self._names[span_id] = span.name
        while len(self._printed) > 16 * self._max_traces:
            old, _ = self._printed.popitem(last=False)
            self._names.pop(old, None)

    def shutdown(self) -> None:
        with self._lock:
            leftovers = list(self._ended.values())
            self._ended.clear()
            self._open.clear()
        for spans in leftovers:
            self._print(spans)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
