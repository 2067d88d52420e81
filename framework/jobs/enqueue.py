"""`enqueue`: put a job's message on the queue, hand back a `JobHandle`.

An immediate job is its message alone until a worker runs it (`messages`); a delayed
one gets a `scheduled` record first, created with compare-and-set. Either message is
stored only if no message of the job id is, so of two enqueues of one `job_id` only one
queues it: the other finds the job and returns it (never a second run). A job that has
finished may be enqueued again under its id: a new run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import BadRequest, ServiceError
from ..observability import tracing as telemetry
from ..observability.logging import get_logger
from ..transport import headers as h
from ..transport.codec import encode_payload
from .backend import Backend
from .control import publish_job, publish_or_take_back, queue_now
from .handle import JobHandle
from .kinds import KindInfo, validate
from .messages import supersedes
from .options import Kind, check_job_id, check_priority
from .status import JobStatus, encode_status, utcnow
from .store import Conflict

if TYPE_CHECKING:
    from ..client import Client
    from ..context import Context

__all__ = ["enqueue"]

_log = get_logger("framework.jobs")

CREATE_TRIES = 5
RECORD_HEADROOM = 1024  # the record grows with a result, an error, the worker's fields


def run_time(delay: float | timedelta | None, at: datetime | None) -> datetime | None:
    """When a delayed job is due (UTC), or None to queue it now."""
    if delay is not None and at is not None:
        raise BadRequest("give delay or at, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if seconds < 0:
            raise BadRequest(f"delay must not be negative, got {seconds:g}")
        return utcnow() + timedelta(seconds=seconds) if seconds > 0 else None
    if at is not None:
        if at.tzinfo is None:
            raise BadRequest("at must be a timezone-aware datetime (e.g. datetime.now(UTC))")
        return at.astimezone(UTC)
    return None


def _headers(job_id: str, correlation_id: str | None, parent: Context | None) -> dict[str, str]:
    """Correlation and causation; none for a job that is its own correlation id (the
    worker takes the job id then: fewer bytes per job)."""
    out: dict[str, str] = {}
    if parent is not None:
        out[h.CORRELATION_ID] = parent.correlation_id
        if parent.message_id:
            out[h.CAUSATION_ID] = parent.message_id
    elif correlation_id:
        out[h.CORRELATION_ID] = h.check_id(h.CORRELATION_ID, correlation_id)
    return out


async def enqueue(
    client: Client,
    kind: str,
    payload: Any = None,
    *,
    job_id: str | None = None,
    delay: float | timedelta | None = None,
    at: datetime | None = None,
    priority: str = "normal",
    returns: Any = Any,
    correlation_id: str | None = None,
    parent: Context | None = None,
) -> JobHandle[Any]:
    """Enqueue a job of `kind` (`<service>.<name>`); see `Client.enqueue`."""
    parsed = Kind.parse(kind)
    check_priority(priority)
    run_at = run_time(delay, at) if delay is not None or at is not None else None
    job_id = check_job_id(job_id) if job_id is not None else h.new_id()
    body = encode_payload(payload)
    backend = await Backend.of(client)
    info = await backend.kinds.lookup(str(parsed))
    if info is not None:
        validate(info, body)
    headers = _headers(job_id, correlation_id, parent)
    if len(body) > client.nc.max_payload // 2:  # the record holds the payload too
        _check_size(client, _record(parsed, job_id, priority, info, run_at, headers, body))
    span = telemetry.start_send_span(
        "publish",
        parsed.queue(priority),
        parent.service if parent is not None else client.name,
        telemetry.SpanKind.PRODUCER,
        parent.span if parent is not None else None,
    )
    try:  # a PRODUCER span whose context travels with the job
        telemetry.inject_context(headers, span)
        if run_at is None:
            await queue_now(client, backend, parsed, job_id, priority, body, headers)
        else:
            status = _record(parsed, job_id, priority, info, run_at, headers, body)
            trace = telemetry.log_ids(span).get("trace_id", "")
            await _schedule(client, backend, parsed, msgspec.structs.replace(status, trace_id=trace), headers)  # fmt: skip
    except Exception as exc:
        telemetry.record_error(span, exc)
        raise
    finally:
        span.end()
    return JobHandle.known(client, parsed, job_id, returns)


def _record(
    kind: Kind,
    job_id: str,
    priority: str,
    info: KindInfo | None,
    run_at: datetime | None,
    headers: dict[str, str],
    body: bytes,
) -> JobStatus:
    """The record a delayed job is created with (and any job's, to check its size)."""
    return JobStatus(
        kind=str(kind),
        id=job_id,
        state="scheduled" if run_at is not None else "queued",
        priority=priority,
        max_attempts=info.max_attempts if info is not None else 0,
        enqueued_at=utcnow(),
        run_at=run_at,
        correlation_id=headers.get(h.CORRELATION_ID, job_id),
        payload=msgspec.Raw(body) if body else None,
    )


def _check_size(client: Client, status: JobStatus) -> None:
    size = len(encode_status(status)) + RECORD_HEADROOM
    if size > client.nc.max_payload:
        raise ServiceError(
            413,
            f"job of {status.kind}: its record would be {size} bytes, over the server's "
            f"max_payload of {client.nc.max_payload} (keep large data elsewhere, pass a key)",
        )


async def _schedule(
    client: Client, backend: Backend, kind: Kind, status: JobStatus, headers: dict[str, str]
) -> None:
    """A delayed job: its `scheduled` record, then its `@at` schedule (see `control`)."""
    key = kind.status_key(status.id)
    for _ in range(CREATE_TRIES):
        entry, message = await backend.read(kind, status.id)
        if message is not None and supersedes(message, entry.status):
            return  # queued without a record: the same job, never a second run
        if entry.status is not None and not entry.status.final:
            await _repair(client, kind, entry.status, entry.revision, headers)
            return  # the same job: never a second run
        if message is not None:  # the last run's, recorded as finished, its ack under way
            await backend.messages.delete(message.seq)
        try:  # a new job, or a new run of a finished one
            revision = await backend.store.put(key, status, entry.revision)
        except Conflict:
            continue
        if await publish_or_take_back(client, backend, kind, status, revision, headers):
            return
    raise ServiceError(409, f"job {kind}/{status.id} keeps changing; not enqueued")


async def _repair(
    client: Client, kind: Kind, status: JobStatus, revision: int, headers: dict[str, str]
) -> None:
    """A duplicate enqueue of a delayed job still waiting sends its message again: the
    stream refuses it while the first is there, and stores it if the first never was
    (an enqueue that crashed between record and message)."""
    if status.state not in ("queued", "scheduled"):
        return
    if status.correlation_id:
        headers = {**headers, h.CORRELATION_ID: status.correlation_id}
    try:
        await publish_job(client, kind, status, revision, headers)
    except Exception as exc:  # the job exists; its first message may well be there
        _log.warning("duplicate enqueue: message not re-sent", kind=str(kind), error=str(exc))
