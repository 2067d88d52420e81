"""Putting a job's message on its queue, and cancelling or retrying a job.

An immediate job is queued as its message alone (see `messages`): one write, and no
record until a worker runs it. A delayed job gets its `scheduled` record first, then
its `@at` schedule: the worker that takes the fired message reads the record to decide,
so a cancel holds however late the schedule fires. Either message is stored only if no
message of the same job id is in `JOBS`; a record written for a message that could not
be stored is taken back (deleted).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from nats.errors import NoRespondersError
from nats.js.errors import APIError

from ..errors import BadRequest, NotFound, PublishError, ServiceError
from ..events.deadletter import REPLAY_OF
from ..events.publish import publish_error
from ..observability.logging import get_logger
from ..transport import headers as h
from .backend import Backend
from .messages import (
    JOB_ID,
    JOB_REVISION,
    SCHEDULE,
    SCHEDULE_TARGET,
    JobMessage,
    supersedes,
)
from .options import JOBS_STREAM, Kind, id_token
from .status import JobStatus, utcnow
from .store import Conflict, Entry

if TYPE_CHECKING:
    from ..client import Client

__all__ = [
    "JOB_ID",
    "JOB_REVISION",
    "cancel_job",
    "publish_job",
    "queue_now",
    "retry_job",
    "stored_publish",
]

_log = get_logger("framework.jobs")

JOB_SCHEDULE = "Job-Schedule"
SCHEDULE_TIME_ZONE = "Nats-Schedule-Time-Zone"
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
WRONG_LAST_SEQUENCE = (10071, 10164)
PUBLISH_TIMEOUT = 5.0
CAS_TRIES = 5
ROOM_WAIT = 0.05  # seconds, times the try: for a finished run's message to be acked


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


def job_headers(
    kind: Kind, job_id: str, headers: Mapping[str, str], revision: int, enqueued_ms: int
) -> dict[str, str]:
    """A job message's headers: the caller's, the job id (unless the subject's last
    token is the id itself), `Job-Revision`, and the check that no message of the id is
    stored (its priorities and delay: `Kind.any_subject`)."""
    token = id_token(job_id)
    out = dict(headers)
    if token != job_id:
        out[JOB_ID] = job_id
    out[JOB_REVISION] = f"{revision} {enqueued_ms}"
    out[EXPECTED_LAST_SUBJECT_SEQUENCE] = "0"
    out[EXPECTED_SUBJECT] = kind.any_subject(job_id)
    return out


async def publish_job(
    client: Client, kind: Kind, status: JobStatus, revision: int, headers: Mapping[str, str]
) -> int:
    """The job's message, on its priority's queue or held by an `@at` schedule, stored
    only if no message of the job id is (0 when one is). `revision` is the record's
    the message was written for, 0 when none was (see `messages`)."""
    enqueued = status.enqueued_at.timestamp() if status.enqueued_at is not None else 0.0
    out = job_headers(kind, status.id, headers, revision, int(enqueued * 1000))
    data = msgspec.json.encode(status.payload) if status.payload is not None else b""
    target = kind.queue_subject(status.priority, status.id)
    if status.state == "scheduled" and status.run_at is not None:
        out[SCHEDULE] = f"@at {rfc3339(status.run_at)}"
        out[SCHEDULE_TARGET] = target
        return await stored_publish(client, kind.delay_subject(status.id), data, out)
    return await stored_publish(client, target, data, out)


async def queue_now(
    client: Client,
    backend: Backend,
    kind: Kind,
    job_id: str,
    priority: str,
    body: bytes,
    headers: Mapping[str, str],
) -> bool:
    """Queue an immediate job as its message alone: True once stored, False when a
    message of the job id is queued or running already (that job is the one asked for).
    The message of a run that has just ended (recorded, its ack on the way) is removed
    first, so a finished job's id starts a new run at once."""
    out = job_headers(kind, job_id, headers, 0, int(time.time() * 1000))
    subject = kind.queue_subject(priority, job_id)
    for attempt in range(1, CAS_TRIES + 1):
        if await stored_publish(client, subject, body, out):
            return True
        entry = await backend.store.get(kind.status_key(job_id))
        message = await backend.messages.find(kind, job_id)
        if message is not None:
            if not spent(message, entry):
                return False
            try:
                await backend.messages.delete(message.seq)
            except Exception:  # not allowed to (permissions): its worker acks it soon
                await anyio.sleep(ROOM_WAIT * attempt)
    raise ServiceError(409, f"job {kind}/{job_id} keeps changing; not enqueued")


def spent(message: JobMessage, entry: Entry) -> bool:
    """Whether a message's run is over: its record is final and was written for this
    message (its `seq`) or after the message was queued (a later revision)."""
    status = entry.status
    if status is None or not status.final:
        return False
    if status.seq == message.seq:
        return True
    queued_at = message.revision or 0  # the record revision it was queued at
    return 0 < queued_at < entry.revision and REPLAY_OF not in message.headers


async def cancel_job(client: Client, kind: str, job_id: str) -> bool:
    """Cancel a job unless it has finished: True if this call cancelled it.

    The record is set to `cancelled` first (written from the message for a job queued
    without one); then the job's message is deleted, so no worker receives it (a
    running job's is kept: its worker acks it once stopped); then every worker of the
    kind is told (`<job id> <revision> <message sequence>`): one that holds the message
    already skips it, one that runs it cancels the handler. It returns once the server
    has the notice, so workers are told before the call returns (a worker that frees a
    slot for a held job then has the notice, barring a lost connection).
    """
    parsed = Kind.parse(kind)
    backend = await Backend.of(client)
    key = parsed.status_key(job_id)
    for _ in range(CAS_TRIES):
        entry, message = await backend.read(parsed, job_id)
        if message is not None and supersedes(message, entry.status):
            base = await backend.from_message(parsed, job_id, message)
            base = msgspec.structs.replace(base, seq=message.seq)
        elif entry.status is None:
            raise NotFound(f"no job {kind}/{job_id}")
        elif entry.status.final:
            return False
        else:
            base = entry.status
        cancelled = msgspec.structs.replace(
            base, state="cancelled", finished_at=utcnow(), message="cancelled"
        )
        try:
            revision = await backend.store.put(key, cancelled, entry.revision)
        except Conflict:
            continue
        if base.state in ("scheduled", "queued"):
            await _remove_messages(backend, parsed, job_id, message)
        notice = f"{job_id} {revision} {cancelled.seq}".encode()
        await client.nc.publish(parsed.cancel_subject, notice)
        await client.nc.flush(int(PUBLISH_TIMEOUT))  # the server has routed it to the workers
        return True
    raise ServiceError(409, f"job {kind}/{job_id} keeps changing; cancel not applied")


async def _remove_messages(
    backend: Backend, kind: Kind, job_id: str, message: JobMessage | None
) -> None:
    """Delete the cancelled job's message (a delayed job's schedule may have fired since
    it was read: its message is deleted too). Workers are told as well; one holding the
    message skips it, and the record says cancelled either way."""
    try:
        if message is None:
            message = await backend.messages.find(kind, job_id)
        if message is not None:
            await backend.messages.delete(message.seq)
            if message.delayed:
                fired = await backend.messages.find(kind, job_id)
                if fired is not None:
                    await backend.messages.delete(fired.seq)
    except Exception as exc:
        _log.warning("cancelled job's message not removed", job_id=job_id, error=str(exc))


async def retry_job(client: Client, kind: str, job_id: str) -> JobStatus:
    """Queue a failed or cancelled job again, from its stored payload, as attempt 1."""
    parsed = Kind.parse(kind)
    backend = await Backend.of(client)
    for _ in range(CAS_TRIES):
        current = await backend.current(parsed, job_id)
        if current is None:
            raise NotFound(f"no job {kind}/{job_id}")
        if current.state not in ("failed", "cancelled"):
            raise ServiceError(
                409, f"job {kind}/{job_id} is {current.state}: only a failed or "
                "cancelled job can be retried",
            )  # fmt: skip
        again = fresh_run(current)
        headers = {h.CORRELATION_ID: again.correlation_id} if again.correlation_id else {}
        body = msgspec.json.encode(again.payload) if again.payload is not None else b""
        if await queue_now(client, backend, parsed, job_id, again.priority, body, headers):
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
) -> bool:
    """Publish the message the record at `revision` was written for: True once stored.
    If it is not stored (refused because a message of the job id is there: False), the
    record is deleted, so it never stands for a job that does not run."""
    try:
        if await publish_job(client, kind, status, revision, headers):
            return True
    except (PublishError, ServiceError):
        await _take_back(backend, kind.status_key(status.id), revision)
        raise
    await _take_back(backend, kind.status_key(status.id), revision)
    return False


async def _take_back(backend: Backend, key: str, revision: int) -> None:
    try:
        await backend.store.delete(key, revision)
    except Exception as exc:
        _log.error("job record left without its message", key=key, error=str(exc))
