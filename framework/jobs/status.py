"""A job's status record: what the `jobs` key-value bucket holds for each job.

One record per job, rewritten (compare-and-set on its revision) at every change of
state and, coalesced, of progress. The record is the job's truth: a worker runs a
delivered message only if the record says the job still waits for it, so a duplicate
message, a redelivery after success or a cancelled job never runs the handler.

    scheduled --(run_at passes)--> queued --> running --> succeeded
                                     |          |  ^
                                     |          v  |
                                     |        retrying --(attempts exhausted)--> failed
                                     +------------+------> cancelled
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, get_args

import msgspec

__all__ = ["FINAL_STATES", "JobState", "JobStatus", "decode_status", "encode_status", "utcnow"]

JobState = Literal["scheduled", "queued", "running", "retrying", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
WAITING_STATES: frozenset[str] = frozenset({"scheduled", "queued", "retrying"})


class JobStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a job is: its state, progress, attempts, result or error, and when.

    `result` and `payload` are plain JSON values (`JobHandle.result` converts the
    result to the type asked for); times are UTC. `worker` is the instance id of the
    service replica that ran the last attempt; `trace_id` is the trace the job was
    enqueued in. `schedule` names the recurring schedule that started the job.
    """

    kind: str
    id: str
    state: JobState
    priority: str = "normal"
    progress: float = 0.0
    message: str = ""
    attempt: int = 0
    max_attempts: int = 0
    result: Any = None
    error: str = ""
    enqueued_at: datetime | None = None
    run_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str = ""
    correlation_id: str = ""
    trace_id: str = ""
    schedule: str = ""
    payload: Any = None
    seq: int = 0  # stream sequence of the message the last attempt ran

    @property
    def final(self) -> bool:
        """Succeeded, failed or cancelled: nothing will change it any more."""
        return self.state in FINAL_STATES


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(JobStatus)


def encode_status(status: JobStatus) -> bytes:
    """JSON of a record, as stored."""
    return _encoder.encode(status)


def decode_status(data: bytes) -> JobStatus:
    """A stored record."""
    return _decoder.decode(data)


def utcnow() -> datetime:
    """Now, in UTC (records keep aware datetimes)."""
    return datetime.now(UTC)


def presented(status: JobStatus, now: datetime | None = None) -> JobStatus:
    """The record as a reader should see it: a delayed job whose time has come is
    `queued` (nothing of ours rewrites the record when the server's schedule fires)."""
    if status.state == "scheduled" and status.run_at is not None:
        if status.run_at <= (now or utcnow()):
            return msgspec.structs.replace(status, state="queued")
    return status
