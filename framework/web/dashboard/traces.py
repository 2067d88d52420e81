"""The most recent traces of a local mesh, as the trees `MESH_TRACE_CONSOLE` prints.

Services started by `mesh up` append their spans to `MESH_TRACE_FILE` (a JSON-lines
file, `.mesh/traces.jsonl`); the dashboard reads the end of that file. Rendering uses
the OpenTelemetry SDK (a dev dependency, needed to write the file in the first place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TAIL_BYTES", "default_trace_file", "recent_traces"]

TAIL_BYTES = 2 * 1024 * 1024  # only the end of the file: the recent traces are there


def default_trace_file() -> Path | None:
    """`MESH_TRACE_FILE`, else `.mesh/traces.jsonl` when it exists (what `mesh up` writes)."""
    configured = os.environ.get("MESH_TRACE_FILE")
    if configured:
        return Path(configured)
    local = Path(".mesh/traces.jsonl")
    return local if local.exists() else None


def _tail_records(path: Path, tail_bytes: int) -> list[dict[str, Any]]:
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - tail_bytes))
        data = file.read()
    lines = data.split(b"\n")
    if size > tail_bytes:
        lines = lines[1:]  # the first line is probably cut
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # empty, or cut short by a concurrent writer
        if isinstance(record, dict) and "trace" in record and "span" in record:
            records.append(record)
    return records


def recent_traces(
    path: Path, *, limit: int = 20, tail_bytes: int = TAIL_BYTES
) -> list[dict[str, Any]]:
    """The `limit` traces that ended last, newest first, each with its rendered tree."""
    try:
        from ...observability.console_traces import render_trace
        from ...observability.trace_file import _span
    except ImportError:  # no SDK: nothing could have written the file either
        return []
    try:
        records = _tail_records(path, tail_bytes)
    except OSError:
        return []
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_trace.setdefault(str(record["trace"]), []).append(record)
    latest = sorted(by_trace.items(), key=lambda kv: max(int(r["end"]) for r in kv[1]))
    result = []
    for trace_id, spans in reversed(latest[-limit:]):
        try:
            readable = [_span(r) for r in spans]
        except (KeyError, TypeError, ValueError):
            continue
        start, end = min(int(r["start"]) for r in spans), max(int(r["end"]) for r in spans)
        result.append(
            {
                "trace_id": trace_id,
                "spans": len(spans),
                "duration_ms": round((end - start) / 1e6, 1),
                "ended": end / 1e9,
                "services": sorted({str(r["service"]) for r in spans if r.get("service")}),
                "errors": sum(1 for r in spans if r.get("error")),
                "tree": render_trace(readable),
            }
        )
    return result
