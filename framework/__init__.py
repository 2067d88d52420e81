"""Microservices on NATS: typed request-reply endpoints, durable JetStream subscribers and
background jobs."""

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
from .jobs.context import JobContext
from .jobs.errors import JobCancelled, JobFailed
from .jobs.handle import JobHandle
from .jobs.status import JobState, JobStatus
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
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "JobState",
    "JobStatus",
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
