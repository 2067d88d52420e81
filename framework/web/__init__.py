"""The mesh on the web: helpers for your FastAPI/Starlette app, and `mesh dashboard`.

Needs the `web` extra (`pip install "natsmesh-framework[web]"`); `framework` itself never
imports this package. See `MeshEdge` for the few lines an HTTP edge needs.
"""

from sse_starlette import EventSourceResponse, ServerSentEvent

from .dashboard import create_app as create_dashboard
from .edge import (
    REQUEST_ID_HEADER,
    MeshEdge,
    MeshMiddleware,
    correlation_id,
    error_body,
    http_status,
)
from .events import EventWatch, MeshEvent, watch_events
from .sse import job_events, sse, to_sse

__all__ = [
    "REQUEST_ID_HEADER",
    "EventSourceResponse",
    "EventWatch",
    "MeshEdge",
    "MeshEvent",
    "MeshMiddleware",
    "ServerSentEvent",
    "correlation_id",
    "create_dashboard",
    "error_body",
    "http_status",
    "job_events",
    "sse",
    "to_sse",
    "watch_events",
]
