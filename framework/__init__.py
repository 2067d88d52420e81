"""Microservices on NATS: typed request-reply endpoints, durable JetStream subscribers and
background jobs.

Everything a user needs is importable from here (`__all__`); the subpackages are the
machinery behind it. Tests get fixtures from the pytest plugin `framework.testing`
(with its `eventually` helper).

    from framework import Service, Context, connect

    service = Service("greeter")

    @service.rpc()
    async def hello(name: str, ctx: Context) -> str:
        return f"hello {name}"
"""

from .client import Client, Connecting, connect
from .context import Context
from .errors import (
    AuthorizationFailed,
    BadRequest,
    ClientClosed,
    ConcurrencyConflict,
    ConfigConflict,
    ConnectionFailed,
    DeadlineExceeded,
    InvalidHandler,
    InvalidName,
    JetStreamError,
    MeshError,
    NoResponders,
    NoStream,
    NotFound,
    PermissionDenied,
    PublishError,
    Reject,
    RemoteError,
    ServiceError,
    StreamUnavailable,
)
from .events.batch import BatchPublisher
from .events.deadletter import (
    DeadLetter,
    discard_dead_letter,
    get_dead_letter,
    list_dead_letters,
    replay_dead_letter,
)
from .events.history import EventRecord
from .events.idempotency import open_bucket
from .events.publish import PublishAck
from .jobs.context import JobContext
from .jobs.errors import JobCancelled, JobFailed
from .jobs.handle import JobHandle
from .jobs.status import JobState, JobStatus
from .observability.logging import configure_logging
from .observability.sdk import configure_telemetry
from .rpc.discovery import EndpointInfo, EndpointStats, InfoResponse, PingResponse, StatsResponse
from .service import Service
from .streams import Stream

__all__ = [
    "AuthorizationFailed",
    "BadRequest",
    "BatchPublisher",
    "Client",
    "ClientClosed",
    "ConcurrencyConflict",
    "ConfigConflict",
    "Connecting",
    "ConnectionFailed",
    "Context",
    "DeadLetter",
    "DeadlineExceeded",
    "EndpointInfo",
    "EndpointStats",
    "EventRecord",
    "InfoResponse",
    "InvalidHandler",
    "InvalidName",
    "JetStreamError",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "JobState",
    "JobStatus",
    "MeshError",
    "NoResponders",
    "NoStream",
    "NotFound",
    "PermissionDenied",
    "PingResponse",
    "PublishAck",
    "PublishError",
    "Reject",
    "RemoteError",
    "Service",
    "ServiceError",
    "StatsResponse",
    "Stream",
    "StreamUnavailable",
    "configure_logging",
    "configure_telemetry",
    "connect",
    "discard_dead_letter",
    "get_dead_letter",
    "list_dead_letters",
    "open_bucket",
    "replay_dead_letter",
]
