"""JetStream streams: one per event domain, declared in code, created on first use.

An existing stream that differs from the declaration is reported with the difference
and left alone: silently rewriting retention or replicas of a live stream loses data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import NotFoundError

from .errors import ConfigConflict, PermissionDenied
from .observability.logging import get_logger
from .transport.names import EVENT_PREFIX, check_token, event_domain

if TYPE_CHECKING:
    from .client import Client

__all__ = [
    "DEADLETTER_STREAM",
    "Stream",
    "deadletter_stream",
    "default_replicas",
    "domain_stream",
    "ensure_stream",
    "ensure_streams",
    "stream_name_for_domain",
    "wait_for_jetstream",
]

_log = get_logger("framework.streams")

DAY = 24 * 3600.0
DEADLETTER_STREAM = "DEADLETTER"
JETSTREAM_WAIT = 30.0  # seconds a starting service waits for JetStream to answer
INFO_SUBJECT = "$JS.API.INFO"  # account info: any JetStream user may ask


def default_replicas() -> int:
    """`MESH_REPLICAS` sets replicas of created streams and buckets (3 on a cluster)."""
    return int(os.environ.get("MESH_REPLICAS", "1"))


@dataclass(frozen=True)
class Stream:
    """A stream declaration; defaults are the design's (file, limits, 7 days, 2 min dedupe).

    Pass it to `Service(streams=[...])`: it is created at start, or checked against
    the existing stream (a difference raises `ConfigConflict`, nothing is changed).

    Args:
        name: the stream's name, e.g. `EVENTS_ORDER`.
        subjects: what it stores, e.g. `["events.order.>"]`.
        retention: `limits`, `interest` or `workqueue`.
        storage: `file` or `memory`.
        max_age: seconds a message is kept (default 7 days).
        max_bytes, max_msgs, max_msg_size: limits; -1 is unlimited.
        duplicate_window: seconds within which a repeated `Nats-Msg-Id` is dropped.
        replicas: copies in a cluster (default `MESH_REPLICAS`, else 1).
        description: shown by `nats stream info`.
        extra: any other `StreamConfig` field of nats-py, as is.
    """

    name: str
    subjects: Sequence[str]
    retention: str = "limits"
    storage: str = "file"
    max_age: float = 7 * DAY
    max_bytes: int = -1
    max_msgs: int = -1
    max_msg_size: int = -1
    duplicate_window: float = 120.0
    replicas: int | None = None  # None: MESH_REPLICAS
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self) -> api.StreamConfig:
        """The declaration as nats-py's `StreamConfig` (Direct Get allowed)."""
        return api.StreamConfig(
            name=self.name,
            description=self.description or None,
            subjects=list(self.subjects),
            retention=api.RetentionPolicy(self.retention),
            storage=api.StorageType(self.storage),
            max_age=self.max_age,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            max_msg_size=self.max_msg_size,
            duplicate_window=self.duplicate_window,
            num_replicas=self.replicas if self.replicas is not None else default_replicas(),
            allow_direct=True,
            **self.extra,
        )


def stream_name_for_domain(domain: str) -> str:
    return "EVENTS_" + check_token(domain, "event domain").upper().replace("-", "_")


def domain_stream(domain: str) -> Stream:
    return Stream(
        name=stream_name_for_domain(domain),
        subjects=[f"{EVENT_PREFIX}.{domain}.>"],
        description=f"events of the {domain} domain",
    )


def deadletter_stream() -> Stream:
    return Stream(
        name=DEADLETTER_STREAM,
        subjects=["deadletter.>"],
        max_age=30 * DAY,
        description="events that could not be handled, with the reason",
    )


_COMPARED = (
    "subjects",
    "retention",
    "storage",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msg_size",
    "duplicate_window",
    "num_replicas",
)


def _normalize(name: str, value: Any) -> Any:
    if name in ("subjects", "filter_subjects"):
        return sorted(value or [])
    if isinstance(value, float):
        return round(value, 3)
    if hasattr(value, "value"):  # an enum of nats-py's api
        return value.value
    return value


def differences(
    existing: Any, declared: Any, fields: Iterable[str] = _COMPARED
) -> dict[str, tuple[Any, Any]]:
    """`fields` whose values differ between two stream or consumer configs, normalized
    (enums to values, floats rounded, subject lists sorted) as (existing, declared)."""
    diff: dict[str, tuple[Any, Any]] = {}
    for name in fields:
        a = _normalize(name, getattr(existing, name))
        b = _normalize(name, getattr(declared, name))
        if a != b:
            diff[name] = (a, b)
    return diff


async def wait_for_jetstream(client: Client, timeout: float = JETSTREAM_WAIT) -> None:
    """Return once JetStream answers, or after `timeout` seconds (the requests that
    follow then fail as they would have without the wait).

    A cluster takes clients before its nodes have elected a JetStream meta leader and
    ignores JetStream requests until then: about half a second after a start here, 5 s
    and more on a busy machine. A service started together with its servers (a script, compose)
    waits for that instead of failing on its first request. A server without JetStream
    (no responders) or a user not allowed to ask answers at once; what that means is
    left to the request that follows.
    """
    deadline = anyio.current_time() + timeout
    warned = False
    while (left := deadline - anyio.current_time()) > 0:
        ask = client.nc.request(INFO_SUBJECT, b"", timeout=min(1.0, left))
        try:
            await client.refusable(INFO_SUBJECT, ask)
            return  # an answer, even an error, comes from JetStream
        except (NoRespondersError, PermissionDenied):
            return
        except NatsTimeout:
            if not warned:
                _log.warning("waiting for JetStream (a cluster electing its leader?)")
                warned = True


async def ensure_stream(client: Client, stream: Stream, *, strict: bool = True) -> None:
    """Create the stream, or check that the existing one matches (`strict`)."""
    js = client.js
    declared = stream.config()
    try:
        info = await js.stream_info(stream.name)
    except NotFoundError:
        try:
            await js.add_stream(declared)
            _log.info("stream created", stream=stream.name, subjects=list(stream.subjects))
            return
        except Exception as create_error:
            try:
                info = await js.stream_info(stream.name)  # created meanwhile by a replica
            except NotFoundError:
                raise create_error from None  # not a race: say why it was refused
    diff = differences(info.config, declared)
    if diff and strict:
        raise ConfigConflict(f"stream {stream.name}", diff)


async def ensure_streams(
    client: Client, declared: Iterable[Stream], event_types: Iterable[str]
) -> None:
    """Declared streams are checked strictly; domain defaults accept what exists."""
    declared = list(declared)
    covered = {subject for stream in declared for subject in stream.subjects}
    for stream in declared:
        await ensure_stream(client, stream)
    for domain in sorted({event_domain(t) for t in event_types}):
        default = domain_stream(domain)
        if not covered.intersection(default.subjects) and not _covers(declared, domain):
            await ensure_stream(client, default, strict=False)
    await ensure_stream(client, deadletter_stream(), strict=False)


def _covers(declared: Sequence[Stream], domain: str) -> bool:
    prefix = f"{EVENT_PREFIX}.{domain}."
    return any(
        subject in (f"{EVENT_PREFIX}.>", f"{prefix}>") or subject.startswith(prefix)
        for stream in declared
        for subject in stream.subjects
    )
