"""Microservices on NATS: typed request-reply endpoints and durable JetStream subscribers."""

from .client import Client, connect
from .context import Context
from .errors import (
    BadRequest,
    ConfigConflict,
    DeadlineExceeded,
    InvalidName,
    NoResponders,
    NoStream,
    NotFound,
    PublishError,
    Reject,
    RemoteError,
    ServiceError,
    StreamUnavailable,
)
from .observability.logging import configure_logging
from .observability.tracing import configure_telemetry
from .service import Service
from .streams import Stream

__all__ = [
    "BadRequest",
    "Client",
    "ConfigConflict",
    "Context",
    "DeadlineExceeded",
    "InvalidName",
    "NoResponders",
    "NoStream",
    "NotFound",
    "PublishError",
    "Reject",
    "RemoteError",
    "Service",
    "ServiceError",
    "Stream",
    "StreamUnavailable",
    "configure_logging",
    "configure_telemetry",
    "connect",
]
