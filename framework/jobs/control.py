"""Putting a job's message on its queue, and cancelling or retrying a job.

The status record is written first, then the message: a worker that receives a
message reads the record to decide whether to run it, so a message never runs a job
that has no record. A message that could not be stored is taken back by deleting the
record it was written for.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import NoRespondersError
from nats.js.errors import APIError

from ..errors import BadRequest, NotFound, PublishError, ServiceError
from ..events.publish import publish_error
from ..observability.logging import get_logger
from ..transport import headers as h
from .backend import Backend
from .options import JOBS_STREAM, Kind
from .status import JobStatus, utcnow
from .store import Conflict

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["JOB_ID", "cancel_job", "publish_job", "retry_job", "stored_publish"]

_log = get_logger("framework.jobs")

JOB_ID = "Job-Id"
JOB_REVISION = "Job-Revision"  # `<record revision> <enqueued_at, epoch ms>`: see process.py
JOB_SCHEDULE = "Job-Schedule"
SCHEDULE = "Nats-Schedule"
SCHEDULE_TARGET = "Nats-Schedule-Target"
SCHEDULE_TIME_ZONE = "Nats-Schedule-Time-Zone"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
WRONG_LAST_SEQUENCE = (10071, 10164)
PUBLISH_TIMEOUT = 5.0
CAS_TRIES = 5


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


async def stored_publish(client: Client, subject: str, data: bytes, headers: dict[str, str]) -> int:
    """A JetStream publish that returns the stream sequence once stored, or raises
    `PublishError` (`NoStream` when nothing captures the subject). A publish refused
    because `Nats-Expected-Last-Subject-Sequence: 0` found a message (the job is queued
    already) returns 0."""
    size = h.wire_size(data, headers)
    if size > client.nc.max_payload:
        raise ServiceError(
            413, f"job message of {size} bytes exceeds max_payload {client.nc.max_payload}"
        )
    try:
        mux = await client.mux()
        reply = await client.refusable(
            subject, mux.request(subject, data, PUBLISH_TIMEOUT, headers)
        )
    except Exception as exc:
        raise publish_error(subject, exc) from None
    ack = _decode_ack(reply.data) if reply.data else None
    if ack is None:
        raise publish_error(subject, NoRespondersError())
    if ack.error is not None:
        if ack.error.get("err_code") in WRONG_LAST_SEQUENCE:
            return 0
        if ack.error.get("code") == 400:  # the stream refused what we asked (a schedule)
            raise BadRequest(f"refused by {JOBS_STREAM}: {ack.error.get('description')}")
        refused = APIError(
            code=ack.error.get("code"),
            description=ack.error.get("description"),
            err_code=ack.error.get("err_code"),
        )
        raise publish_error(subject, refused)
    return ack.seq


def rfc3339(when: datetime) -> str:
    """UTC time as ADR-51's `@at` wants it, with milliseconds and `Z`."""
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def publish_job(
    client: Client, kind: Kind, status: JobStatus, revision: int, headers: Mapping[str, str]
) -> int:
    """The job's message: on its priority's queue, or held by an `@at` schedule."""
    out = dict(headers)
    out[JOB_ID] = status.id
    if status.enqueued_at is not None:
        out[JOB_REVISION] = f"{revision} {int(status.enqueued_at.timestamp() * 1000)}"
    data = msgspec.json.encode(status.payload) if status.payload is not None else b""
    target = kind.queue_subject(status.priority, status.id)
    if status.state == "scheduled" and status.run_at is not None:
        out[SCHEDULE] = f"@at {rfc3339(status.run_at)}"
        out[SCHEDULE_TARGET] = target
        return await stored_publish(client, kind.delay_subject(status.id), data, out)
    out[EXPECTED_LAST_SUBJECT_SEQUENCE] = "0"  # only if the job is not queued already
    return await stored_publish(client, target, data, out)


async def cancel_job(client: Client, kind: str, job_id: str) -> bool:
    """Cancel a job unless it has finished: True if this call cancelled it.

    The record is set to `cancelled` first; then the job's message is removed from
    its queue (or its schedule, for a delayed job), so no worker receives it; then
    every worker of the kind is told (`<job id> <revision>`): one that holds the
    message already skips it, one that runs it cancels the handler.
    """
    parsed = Kind.parse(kind)
    backend = await Backend.of(client)
    key = parsed.status_key(job_id)
    for _ in range(CAS_TRIES):
        entry = await backend.store.get(key)
        if entry.status is None:
            raise NotFound(f"no job {kind}/{job_id}")
        if entry.status.final:
            return False
        cancelled = msgspec.structs.replace(
            entry.status, state="cancelled", finished_at=utcnow(), message="cancelled"
        )
        try:
            revision = await backend.store.put(key, cancelled, entry.revision)
        except Conflict:
            continue
        if entry.status.state == "scheduled":  # its schedule may have fired already
            await _remove_message(client, parsed.delay_subject(job_id))
        if entry.status.state in ("scheduled", "queued"):
            await _remove_message(client, parsed.queue_subject(entry.status.priority, job_id))
        await client.nc.publish(parsed.cancel_subject, f"{job_id} {revision}".encode())
        return True
    raise ServiceError(409, f"job {kind}/{job_id} keeps changing; cancel not applied")


async def _remove_message(client: Client, subject: str) -> None:
    try:
        await client.js.purge_stream(JOBS_STREAM, subject=subject)
    except Exception as exc:  # workers are told too; a running one stops at its next write
        _log.warning("cancelled job's message not removed", subject=subject, error=str(exc))


async def retry_job(client: Client, kind: str, job_id: str) -> JobStatus:
    """Queue a failed or cancelled job again, from its stored payload, as attempt 1."""
    parsed = Kind.parse(kind)
    backend = await Backend.of(client)
    key = parsed.status_key(job_id)
    for _ in range(CAS_TRIES):
        entry = await backend.store.get(key)
        if entry.status is None:
            raise NotFound(f"no job {kind}/{job_id}")
        if entry.status.state not in ("failed", "cancelled"):
            raise ServiceError(
                409, f"job {kind}/{job_id} is {entry.status.state}: only a failed or "
                "cancelled job can be retried",
            )  # fmt: skip
        again = fresh_run(entry.status)
        try:
            revision = await backend.store.put(key, again, entry.revision)
        except Conflict:
            continue
        headers = {h.CORRELATION_ID: again.correlation_id} if again.correlation_id else {}
        await publish_or_take_back(client, backend, parsed, again, revision, headers)
        return again
    raise ServiceError(409, f"job {kind}/{job_id} keeps changing; retry not applied")


def fresh_run(status: JobStatus, **changes: Any) -> JobStatus:
    """The record of a job starting over: queued, nothing run yet."""
    return msgspec.structs.replace(
        status,
        state="queued",
        progress=0.0,
        message="",
        attempt=0,
        result=None,
        error="",
        enqueued_at=utcnow(),
        run_at=None,
        started_at=None,
        finished_at=None,
        worker="",
        seq=0,
        **changes,
    )


async def publish_or_take_back(
    client: Client,
    backend: Backend,
    kind: Kind,
    status: JobStatus,
    revision: int,
    headers: Mapping[str, str],
) -> None:
    """Publish the job's message; if it is not stored, delete the record written for it,
    so retrying the same `job_id` starts clean instead of finding a job that never runs."""
    try:
        await publish_job(client, kind, status, revision, headers)
    except (PublishError, ServiceError):
        key = kind.status_key(status.id)
        try:
            await backend.store.delete(key, revision)
        except Exception as exc:
            _log.error("job record left without its message", key=key, error=str(exc))
        raise
