"""structlog set up by one call: JSON lines for machines, a readable console for people."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["configure_logging", "redact_secrets"]

_SECRET_WORDS = ("authorization", "password", "secret", "token", "api-key", "apikey", "cookie")


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Header values named like secrets never reach a log line."""
    headers = event.get("headers")
    if isinstance(headers, dict):
        event["headers"] = {
            k: ("[redacted]" if any(w in k.lower() for w in _SECRET_WORDS) else v)
            for k, v in headers.items()
        }
    return event


def configure_logging(*, json: bool | None = None, level: str | None = None) -> None:
    """JSON when stderr is not a terminal (or LOG_FORMAT=json); console otherwise."""
    if json is None:
        fmt = os.environ.get("LOG_FORMAT", "").lower()
        json = fmt == "json" if fmt else not sys.stderr.isatty()
    level_name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
