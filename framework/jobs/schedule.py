"""Recurring jobs: message schedules (ADR-51) kept by the server, not by a process of ours.

A schedule is one message at `jobs.<service>.<name>.schedule.<schedule name>` with a
`Nats-Schedule` header (`@every 1h`, `@hourly`, or a 6-field cron expression with
seconds) and `Nats-Schedule-Target` naming the kind's priority subject; the server
copies its body and headers there at each firing, and each copy runs as a new job
(id `<schedule name>-<stream sequence>`). Publishing to the same subject replaces the
schedule; purging the subject ends it. A kind declared with `schedule=` owns the
schedule named `_code`, made to match the code each time a worker starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from nats.js.errors import NotFoundError

from ..observability.logging import get_logger
from ..transport import headers as h
from ..transport.codec import encode_payload
from .backend import Backend
from .control import JOB_SCHEDULE, SCHEDULE_TIME_ZONE, stored_publish
from .declare import RECURRING_SINCE, require_server
from .kinds import validate
from .messages import SCHEDULE, SCHEDULE_TARGET
from .options import (
    CODE_SCHEDULE,
    JOBS_STREAM,
    Kind,
    check_priority,
    check_schedule_name,
    normalize_spec,
    priority_of,
)

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Schedule", "list_schedules", "normalize_spec", "schedule", "unschedule"]

_log = get_logger("framework.jobs")


class Schedule(msgspec.Struct, kw_only=True):
    """A recurring schedule as the server keeps it."""

    kind: str
    name: str
    spec: str
    priority: str
    time_zone: str = ""
    payload: Any = None


async def put_schedule(
    client: Client,
    kind: Kind,
    name: str,
    spec: str,
    body: bytes,
    priority: str,
    time_zone: str | None = None,
) -> None:
    """Store (or replace) a recurring schedule; the server checks `spec`."""
    require_server(client, RECURRING_SINCE, "recurring jobs (@every and cron schedules)")
    headers = {
        SCHEDULE: spec,
        SCHEDULE_TARGET: kind.queue_subject(priority, name),
        JOB_SCHEDULE: name,
    }
    if time_zone:
        headers[SCHEDULE_TIME_ZONE] = time_zone
    await stored_publish(client, kind.schedule_subject(name), body, headers)


async def schedule(
    client: Client,
    kind: str,
    payload: Any = None,
    *,
    cron: str | None = None,
    every: float | str | None = None,
    name: str | None = None,
    priority: str = "normal",
    time_zone: str | None = None,
) -> str:
    """Run a job of `kind` on a schedule; returns the schedule's name (see
    `Client.schedule`)."""
    parsed = Kind.parse(kind)
    check_priority(priority)
    spec = normalize_spec(cron, every)
    name = check_schedule_name(name) if name is not None else h.new_id()
    body = encode_payload(payload)
    backend = await Backend.of(client)
    info = await backend.kinds.lookup(str(parsed))
    if info is not None:
        validate(info, body)
    await put_schedule(client, parsed, name, spec, body, priority, time_zone)
    return name


async def unschedule(client: Client, kind: str, name: str) -> bool:
    """End a schedule; False when there was none of that name."""
    parsed = Kind.parse(kind)
    if name != CODE_SCHEDULE:
        check_schedule_name(name)
    await Backend.of(client)
    subject = parsed.schedule_subject(name)
    try:
        await client.js.get_last_msg(JOBS_STREAM, subject)
    except NotFoundError:
        return False
    await client.js.purge_stream(JOBS_STREAM, subject=subject)
    return True


def _read(subject: str, headers: Mapping[str, str], data: bytes) -> Schedule:
    _, service, job, _, name = subject.split(".", 4)
    target = headers.get(SCHEDULE_TARGET, "")
    try:
        payload = msgspec.json.decode(data) if data else None
    except msgspec.DecodeError:
        payload = data.decode("utf-8", "replace")
    return Schedule(
        kind=f"{service}.{job}",
        name=name,
        spec=headers.get(SCHEDULE, ""),
        priority=priority_of(target),
        time_zone=headers.get(SCHEDULE_TIME_ZONE, ""),
        payload=payload,
    )


async def list_schedules(client: Client, kind: str | None = None) -> list[Schedule]:
    """Every recurring schedule (of `kind`), as stored on the server."""
    prefix = f"jobs.{Kind.parse(kind)}" if kind else "jobs.*.*"
    await Backend.of(client)
    info = await client.js.stream_info(JOBS_STREAM, subjects_filter=f"{prefix}.schedule.*")
    found = []
    for subject in sorted((info.state.subjects or {}).keys()):
        try:
            raw = await client.js.get_last_msg(JOBS_STREAM, subject)
        except NotFoundError:
            continue  # ended meanwhile
        found.append(_read(subject, raw.headers or {}, raw.data or b""))
    return found


async def sync_code_schedule(
    client: Client, kind: Kind, spec: str | None, body: bytes, priority: str = "normal"
) -> None:
    """Make the kind's `_code` schedule what the code declares (or remove it). An
    unchanged schedule is left alone, so a restart does not reset an `@every` interval."""
    subject = kind.schedule_subject(CODE_SCHEDULE)
    try:
        existing = await client.js.get_last_msg(JOBS_STREAM, subject)
    except NotFoundError:
        existing = None
    if spec is None:
        if existing is not None:
            await client.js.purge_stream(JOBS_STREAM, subject=subject)
            _log.info("code schedule removed", kind=str(kind))
        return
    if existing is not None:
        current = _read(subject, existing.headers or {}, existing.data or b"")
        if (current.spec, current.priority, existing.data or b"") == (spec, priority, body):
            return
    await put_schedule(client, kind, CODE_SCHEDULE, spec, body, priority)
    _log.info("code schedule set", kind=str(kind), schedule=spec)
