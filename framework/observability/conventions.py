"""Names shared by the tracing modules: span attributes and the `MESH_TRACING` switch.

A module of constants that imports nothing of the framework, so `tracing`, `sdk`,
`console_traces` and `trace_file` all read them without importing each other.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = [
    "CONVERSATION_ID",
    "DELIVERY_ATTEMPT",
    "ENABLED",
    "MESSAGE_ID",
    "SERVICE",
    "STREAM_SEQUENCE",
    "SYSTEM",
    "flag",
]


def flag(name: str, default: bool) -> bool:
    """An on/off environment variable: unset is `default`; 0, false, no, off are off."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in ("0", "false", "no", "off")


ENABLED: Final = flag("MESH_TRACING", True)
"""False when `MESH_TRACING=0`: spans are INVALID_SPAN, nothing reaches the API."""

SYSTEM = "nats"
SERVICE = "mesh.service"  # the framework service a span belongs to (one process may run several)
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
DELIVERY_ATTEMPT = "messaging.nats.message.delivery_attempt"
STREAM_SEQUENCE = "messaging.nats.message.stream_sequence"
