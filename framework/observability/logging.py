"""structlog set up by one call: JSON lines for machines, a readable console for people.

Until something configures structlog (`configure_logging()`, `Service.run`, `mesh`,
or the application's own `structlog.configure`), the framework's loggers
(`get_logger`) stay quiet below WARNING, or below `LOG_LEVEL` when it is set: a plain
script that only calls services prints nothing of the framework's.

Every line gets the level, a UTC timestamp and, while a span is current (inside a
handler, with an SDK installed), its `trace_id` and `span_id`. `ctx.log` adds the
service, handler, subject, correlation id, event id and attempt. Values of headers
named like secrets, and top-level fields named like them, are redacted; payloads are
never logged by the framework. Standard-library logging (nats-py, asyncio) goes
through the same renderer, so a JSON log stays JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

__all__ = ["add_trace_ids", "configure_logging", "get_logger", "is_secret", "redact_secrets"]

REDACTED = "[redacted]"
_SECRET_WORDS = (
    "auth",  # Authorization, Proxy-Authorization, X-Auth-Token
    "password",
    "passwd",
    "secret",
    "token",
    "api-key",
    "apikey",
    "cookie",
    "credential",
    "session",
    "signature",
    "jwt",
    "nkey",
    "seed",
    "private-key",
)


def is_secret(name: str) -> bool:
    """True for header or field names that usually carry credentials."""
    lowered = name.lower().replace("_", "-")
    return any(word in lowered for word in _SECRET_WORDS)


def _redact_mapping(values: Mapping[Any, Any]) -> dict[Any, Any]:
    return {k: (REDACTED if isinstance(k, str) and is_secret(k) else v) for k, v in values.items()}


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Header values named like secrets never reach a log line, nor such fields.

    Any mapping under a key ending in `headers` (`headers`, `original_headers`, ...) has
    its secret-named values replaced; so has any top-level string field named like one.
    """
    for key, value in list(event.items()):
        if key == "event":
            continue
        if isinstance(value, Mapping) and key.lower().endswith("headers"):
            event[key] = _redact_mapping(value)
        elif isinstance(value, str) and is_secret(key):
            event[key] = REDACTED
    return event


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The current span's ids, so any line logged inside a handler joins its trace."""
    if "trace_id" not in event:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            event["trace_id"] = format(span_context.trace_id, "032x")
            event["span_id"] = format(span_context.span_id, "016x")
    return event


# One list object for the life of the process: loggers cached on first use keep a
# reference to it, so a later configure_logging() still reaches them.
_PROCESSORS: list[Any] = []


def _level(level: str | int | None, default: str = "INFO") -> int:
    if isinstance(level, int):
        return level
    name = (level or os.environ.get("LOG_LEVEL") or default).strip().upper()
    number = logging.getLevelName(name)
    return number if isinstance(number, int) else logging.getLevelName(default)


_unconfigured: dict[int, Any] = {}


def _quiet_logger() -> Any:
    """structlog's default output, filtered at `LOG_LEVEL` (WARNING when unset)."""
    level = _level(None, default="WARNING")
    logger = _unconfigured.get(level)
    if logger is None:
        logger = structlog.wrap_logger(
            None, wrapper_class=structlog.make_filtering_bound_logger(level)
        )
        _unconfigured[level] = logger
    return logger


class FrameworkLogger:
    """A logger of the framework's own: structlog's once it is configured, until then
    quiet below WARNING (or `LOG_LEVEL`), so an unconfigured library prints no debug."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def _target(self) -> Any:
        if structlog.is_configured():
            return structlog.get_logger(self._name)
        return _quiet_logger()

    def bind(self, **fields: Any) -> Any:
        """A logger with `fields` on every line (resolved now, as configured now)."""
        return self._target().bind(**fields)

    def __getattr__(self, method: str) -> Any:
        return getattr(self._target(), method)


def get_logger(name: str) -> Any:
    """The framework's logger for `name` (a module path such as `framework.client`)."""
    return FrameworkLogger(name)


def configure_logging(
    *,
    json: bool | None = None,
    level: str | int | None = None,
    stream: TextIO | None = None,
) -> None:
    """JSON lines when the stream is not a terminal (or LOG_FORMAT=json); console otherwise.

    `level` defaults to `LOG_LEVEL` (INFO); `stream` to standard error.
    """
    stream = stream if stream is not None else sys.stderr
    if json is None:
        fmt = os.environ.get("LOG_FORMAT", "").strip().lower()
        json = fmt == "json" if fmt else not _isatty(stream)
    level_no = _level(level)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=_isatty(stream))
    )
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
        redact_secrets,
    ]
    _PROCESSORS[:] = [
        structlog.contextvars.merge_contextvars,
        *shared,
        structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    _route_stdlib(stream, level_no, shared, renderer)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so reconfiguring replaces it."""


def _route_stdlib(stream: TextIO, level: int, shared: list[Any], renderer: Any) -> None:
    """Render standard-library records like structlog's, unless the app set up its own."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _Handler)]
    if len(ours) != len(root.handlers):
        return  # somebody else configured logging: leave it
    for handler in ours:
        root.removeHandler(handler)
    handler = _Handler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root.addHandler(handler)
    root.setLevel(level)
