"""A job's message in `JOBS`: the queued record of a job that has no status record yet.

An immediate job (`enqueue` without a delay, `retry`) is its message and nothing else
until a worker records how it ended (or that it started, for a handler busy longer
than `run.CLAIM_DELAY`): one JetStream write per enqueue, not two. What makes that safe:

- At most one message per job id is in `JOBS` at a time: a job's message is stored only
  if none is stored on any of its subjects (`Nats-Expected-Last-Subject-Sequence: 0`
  checked against `jobs.<service>.<name>.*.<id>`: its priorities and its delay).
- A message leaves `JOBS` (acked, terminated, deleted) only after the record of how
  its run ended is stored. A reader that finds no message after reading the record
  reads the record again and can trust what it then finds.
- The message says whether a record was written for it: `Job-Revision: <revision>
  <enqueued, epoch ms>`, revision 0 when none was. For such a message a finished
  record of an earlier run (its `seq` below the message's) is older than the message.

Readers (`status`, `watch`, `cancel`, `retry`, `mesh jobs ls`) find a job's message
with a Direct Get of the last message on that wildcard; `enqueue` and `cancel` delete a
message by its sequence, never by subject (a newer message of the same id is kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec
from nats.js.errors import APIError

from ..transport import headers as h
from ..transport.mux import Mux, status_error
from .options import JOBS_STREAM, PRIORITIES, SUBJECT_PREFIX, Kind, priority_of
from .status import JobStatus

__all__ = [
    "JOB_ID",
    "JOB_REVISION",
    "JobMessage",
    "JobMessages",
    "message_status",
    "parse_revision",
    "supersedes",
]

JOB_ID = "Job-Id"
JOB_REVISION = "Job-Revision"  # `<record revision, 0: none> <enqueued_at, epoch ms>`
SCHEDULE = "Nats-Schedule"
SCHEDULE_TARGET = "Nats-Schedule-Target"
DELAY = "delay"  # the subject token of a delayed job's `@at` schedule
REQUEST_TIMEOUT = 5.0
NO_MESSAGE = 10057  # a delete of a message that is gone already
MAX_LISTED = 10_000  # queued messages `scan` reads at most
_PAGE = 256
_encode = msgspec.json.Encoder().encode


class _Deleted(msgspec.Struct):
    success: bool = False
    error: dict[str, object] | None = None


_decode_deleted = msgspec.json.Decoder(_Deleted).decode


def parse_revision(value: str | None) -> tuple[int, int] | None:
    """`Job-Revision`'s (record revision, enqueued epoch ms), or None if absent or bad."""
    if not value:
        return None
    revision, _, enqueued = value.partition(" ")
    try:
        return int(revision), int(enqueued or 0)
    except ValueError:
        return None


class JobMessage(NamedTuple):
    """A job's message as `JOBS` holds it (a Direct Get reply)."""

    subject: str
    seq: int
    headers: Mapping[str, str]
    data: bytes

    @property
    def revision(self) -> int | None:
        """The record revision the message was queued at; 0: queued without a record."""
        parsed = parse_revision(self.headers.get(JOB_REVISION))
        return parsed[0] if parsed is not None else None

    @property
    def delayed(self) -> bool:
        """A delayed job's `@at` schedule, not a queued job."""
        return self.subject.split(".", 4)[3:4] == [DELAY]

    @property
    def enqueued_at(self) -> datetime | None:
        """When `enqueue` queued it (the header), else when the server stored it."""
        parsed = parse_revision(self.headers.get(JOB_REVISION))
        if parsed is not None and parsed[1]:
            return datetime.fromtimestamp(parsed[1] / 1000, UTC)
        return _time(self.headers.get("Nats-Time-Stamp", ""))


def _time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text).astimezone(UTC) if text else None
    except ValueError:
        return None


def supersedes(message: JobMessage | None, status: JobStatus | None) -> bool:
    """Whether a job's message, not its record, says where the job is now: there is
    no record, or the record is a finished earlier run of a message queued without one."""
    if message is None:
        return False
    if status is None:
        return True
    return message.revision == 0 and status.final and status.seq < message.seq


def message_status(kind: Kind, job_id: str, message: JobMessage, max_attempts: int = 0) -> JobStatus:  # fmt: skip
    """The status a job's message stands for: `queued`, or `scheduled` while delayed."""
    headers = message.headers
    traceparent = headers.get(h.TRACEPARENT, "")
    run_at = None
    priority = priority_of(message.subject)
    if message.delayed:
        priority = priority_of(headers.get(SCHEDULE_TARGET, ""))
        spec = headers.get(SCHEDULE, "")
        run_at = _time(spec.removeprefix("@at ").replace("Z", "+00:00")) if spec else None
    return JobStatus(
        kind=str(kind),
        id=job_id,
        state="scheduled" if message.delayed else "queued",
        priority=priority or "normal",
        max_attempts=max_attempts,
        enqueued_at=message.enqueued_at,
        run_at=run_at,
        correlation_id=headers.get(h.CORRELATION_ID) or job_id,
        trace_id=traceparent[3:35] if len(traceparent) >= 35 else "",
        payload=_payload(message.data),
    )


def _payload(data: bytes) -> object:
    """The payload as a record holds it: JSON, decoded (text if it is not JSON)."""
    if not data:
        return None
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")


def _job_subject(subject: str) -> bool:
    """A priority or delay subject (`jobs.<s>.<n>.<token>.<id>`), not a schedule's."""
    token = subject.split(".", 4)[3:4]
    return bool(token) and (token[0] in PRIORITIES or token[0] == DELAY)


class JobMessages:
    """Job messages in `JOBS`: found, listed and deleted over the connection's mux."""

    timeout = REQUEST_TIMEOUT

    def __init__(self, mux: Mux, stream: str = JOBS_STREAM) -> None:
        self._mux = mux
        self._get = f"$JS.API.DIRECT.GET.{stream}"
        self._delete = f"$JS.API.STREAM.MSG.DELETE.{stream}"

    async def find(self, kind: Kind, job_id: str) -> JobMessage | None:
        """The job's message, on whichever of its subjects (None when there is none)."""
        body = _encode({"multi_last": [kind.any_subject(job_id)]})
        found = await self._read(body)
        return max(found, key=lambda m: m.seq) if found else None

    async def scan(self, kind: Kind | None = None, limit: int = MAX_LISTED) -> list[JobMessage]:
        """Job messages of `kind` (of every kind: None), oldest first, `limit` at most."""
        where = f"{SUBJECT_PREFIX}.{kind.service}.{kind.name}" if kind else f"{SUBJECT_PREFIX}.*.*"
        found: list[JobMessage] = []
        seq = 1
        while len(found) < limit:
            body = _encode({"seq": seq, "next_by_subj": f"{where}.*.*", "batch": _PAGE})
            page = await self._read(body, keep_all=True)
            if not page:
                break
            found.extend(m for m in page if _job_subject(m.subject))
            seq = page[-1].seq + 1
        return found[:limit]

    async def _read(self, body: bytes, *, keep_all: bool = False) -> list[JobMessage]:
        replies = await self._mux.request_many(self._get, body, self.timeout)
        found = []
        for reply in replies:
            headers = reply.headers or {}
            status = headers.get("Status")
            if status is not None:
                if status in ("404", "204"):
                    continue  # none, or the end of a batch
                raise status_error(reply)
            subject = headers.get("Nats-Subject", "")
            if keep_all or _job_subject(subject):
                seq = int(headers.get("Nats-Sequence", "0") or 0)
                found.append(JobMessage(subject, seq, headers, reply.data))
        return found

    async def delete(self, seq: int) -> bool:
        """Remove one message by its sequence; False if it was gone already."""
        body = _encode({"seq": seq, "no_erase": True})
        reply = await self._mux.request(self._delete, body, self.timeout)
        if not reply.data:
            raise status_error(reply)
        answer = _decode_deleted(reply.data)
        if answer.error is not None:
            if answer.error.get("err_code") == NO_MESSAGE:
                return False
            raise APIError(
                code=answer.error.get("code"),  # type: ignore[arg-type]
                description=answer.error.get("description"),  # type: ignore[arg-type]
                err_code=answer.error.get("err_code"),  # type: ignore[arg-type]
            )
        return answer.success
