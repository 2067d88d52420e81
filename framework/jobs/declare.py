"""The JetStream parts jobs live in, created on first use by a worker or a client.

- `JOBS`: work-queue stream on `jobs.>` with message schedules allowed (ADR-51), no
  age limit (a recurring schedule is a message that must stay stored; acked jobs are
  removed by the work-queue retention), a two-minute duplicate window.
- `JOBS_RATE`: counters (ADR-49) in memory, one per kind and time window, a minute old
  at most: what keeps a kind's `rate_limit` across replicas.
- key-value buckets `jobs` (status records, kept for `retention` after their last
  change) and `jobs_kinds` (what each kind takes, written by its workers).

A server without message schedules (older than 2.12) or counters is refused with
`JobsUnsupported` when the stream is declared, not discovered by lost jobs later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nats.js import api
from nats.js.errors import NotFoundError

from ..errors import ConfigConflict
from ..events.idempotency import open_bucket
from ..observability.logging import get_logger
from ..streams import default_replicas
from .errors import JobsUnsupported
from .options import (
    DEFAULT_RETENTION,
    JOBS_STREAM,
    KINDS_BUCKET,
    RATE_PREFIX,
    RATE_STREAM,
    STATUS_BUCKET,
    SUBJECT_PREFIX,
)

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["ensure_jobs_stream", "ensure_rate_stream", "open_kinds_bucket", "open_status_bucket"]

_log = get_logger("framework.jobs")

SCHEDULES_SINCE = (2, 12)  # @at schedules and counters
RECURRING_SINCE = (2, 14)  # @every and cron
RATE_WINDOW_KEEP = 60.0


def server_version(client: Client) -> tuple[int, int]:
    """(major, minor) of the server this client is connected to."""
    version = client.nc.connected_server_version
    return (int(version.major or 0), int(version.minor or 0))


def require_server(client: Client, since: tuple[int, int], what: str) -> None:
    """Refuse at once, with the versions, when the server is too old for `what`."""
    have = server_version(client)
    if have < since:
        raise JobsUnsupported(
            f"{what} needs nats-server {since[0]}.{since[1]} or newer; "
            f"the server is {have[0]}.{have[1]}"
        )


def jobs_stream_config() -> api.StreamConfig:
    """The `JOBS` stream as it is created (see the module docstring)."""
    return api.StreamConfig(
        name=JOBS_STREAM,
        description="background jobs: queued, delayed and recurring (message schedules)",
        subjects=[f"{SUBJECT_PREFIX}.>"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        max_age=0,
        duplicate_window=120.0,
        num_replicas=default_replicas(),
        allow_direct=True,
        allow_msg_schedules=True,
    )


async def _create_or_read(client: Client, config: api.StreamConfig) -> Any:
    js = client.js
    try:
        return await js.stream_info(config.name)
    except NotFoundError:
        pass
    try:
        return await js.add_stream(config)
    except Exception as create_error:
        try:
            return await js.stream_info(config.name)  # a replica created it meanwhile
        except NotFoundError:
            raise create_error from None


async def ensure_jobs_stream(client: Client) -> None:
    """Create `JOBS`, or check the existing one can hold jobs (schedules enabled)."""
    require_server(client, SCHEDULES_SINCE, "background jobs (JetStream message schedules)")
    declared = jobs_stream_config()
    info = await _create_or_read(client, declared)
    existing = info.config
    retention = getattr(existing.retention, "value", existing.retention)
    if retention != "workqueue" or f"{SUBJECT_PREFIX}.>" not in (existing.subjects or []):
        raise ConfigConflict(
            f"stream {JOBS_STREAM}",
            {
                "retention": (retention, "workqueue"),
                "subjects": (existing.subjects, declared.subjects),
            },
        )
    if not existing.allow_msg_schedules:
        existing.allow_msg_schedules = True  # can be enabled on a live stream
        info = await client.js.update_stream(existing)
        if not info.config.allow_msg_schedules:
            raise JobsUnsupported(
                f"stream {JOBS_STREAM}: the server did not enable message schedules"
            )
        _log.warning("message schedules enabled on an existing stream", stream=JOBS_STREAM)


async def ensure_rate_stream(client: Client) -> None:
    """The counters behind `rate_limit`: memory is enough, a window lives a second."""
    require_server(client, SCHEDULES_SINCE, "rate_limit (JetStream counters)")
    config = api.StreamConfig(
        name=RATE_STREAM,
        description="rate limits of background jobs: starts per kind and window",
        subjects=[f"{RATE_PREFIX}.>"],
        storage=api.StorageType.MEMORY,
        max_age=RATE_WINDOW_KEEP,
        max_msgs_per_subject=1,
        num_replicas=default_replicas(),
        allow_msg_counter=True,
    )
    info = await _create_or_read(client, config)
    if not info.config.allow_msg_counter:
        raise JobsUnsupported(f"stream {RATE_STREAM} exists without counters enabled")


async def open_status_bucket(client: Client, retention: float = DEFAULT_RETENTION) -> Any:
    """The `jobs` bucket of status records, kept `retention` seconds after a write."""
    return await open_bucket(
        client, STATUS_BUCKET, retention, "status and progress of background jobs"
    )


async def open_kinds_bucket(client: Client) -> Any:
    """No time limit: a kind stays known while none of its workers runs."""
    return await open_bucket(client, KINDS_BUCKET, 0, "job kinds: payload schemas and settings")
