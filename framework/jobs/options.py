"""What a job kind is declared with, and the names it lives under on the wire.

A kind is `<service>.<name>`. Its jobs are messages in the `JOBS` stream (work-queue
retention) on a subject of its own under its priority, `jobs.<service>.<name>.<priority>.
<id>` (published only if that subject holds no message, so a job is never queued
twice); a delayed job waits in a message schedule (ADR-51) at
`jobs.<service>.<name>.delay.<id>`, a recurring one at
`jobs.<service>.<name>.schedule.<schedule name>` (targeting
`...<priority>.<schedule name>`). Status records live in the `jobs` key-value bucket at
`<service>.<name>.<id>`; cancel notices go to `$JOBS.CANCEL.<service>.<name>`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import BadRequest, InvalidName
from ..transport.names import check_endpoint_name, check_service_name

__all__ = [
    "CANCEL_PREFIX",
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RETENTION",
    "JOBS_STREAM",
    "KINDS_BUCKET",
    "PRIORITIES",
    "RATE_STREAM",
    "STATUS_BUCKET",
    "JobOptions",
    "Kind",
    "Priority",
    "RateLimit",
    "check_job_id",
    "check_priority",
    "id_token",
    "normalize_spec",
]

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)  # the order workers take them in

JOBS_STREAM = "JOBS"
SUBJECT_PREFIX = "jobs"
CANCEL_PREFIX = "$JOBS.CANCEL"
STATUS_BUCKET = "jobs"
KINDS_BUCKET = "jobs_kinds"
RATE_STREAM = "JOBS_RATE"
RATE_PREFIX = "jobs-rate"
CODE_SCHEDULE = "_code"  # the schedule a `@service.job(schedule=...)` declares

DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF = (1.0, 5.0, 30.0)
DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_CONCURRENCY = 16

_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_=-]{1,64}$")
_SCHEDULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Kind:
    """A job kind, `<service>.<name>`, and every subject and key derived from it."""

    service: str
    name: str

    @classmethod
    def parse(cls, kind: str) -> Kind:
        """`<service>.<name>`, checked (`InvalidName`); known kinds come from a cache."""
        found = _kinds.get(kind) if isinstance(kind, str) else None
        if found is not None:
            return found
        service, dot, name = kind.partition(".") if isinstance(kind, str) else ("", "", "")
        if not dot:
            raise InvalidName(f"invalid job kind {kind!r}: expected '<service>.<name>'")
        parsed = cls(check_service_name(service), check_endpoint_name(name))
        if len(_kinds) < 1024:
            _kinds[kind] = parsed
        return parsed

    def __str__(self) -> str:
        return f"{self.service}.{self.name}"

    def queue(self, priority: str) -> str:
        """The kind's queue of one priority (span names, the consumer's filter base)."""
        return f"{SUBJECT_PREFIX}.{self.service}.{self.name}.{priority}"

    def queue_subject(self, priority: str, job_id: str) -> str:
        """A job's own subject: at most one message per job is ever queued there."""
        return f"{self.queue(priority)}.{id_token(job_id)}"

    def any_subject(self, job_id: str) -> str:
        """Every subject a job's message can be on (its priorities and its delay): at
        most one message matches at a time (`enqueue` publishes only when none does)."""
        return f"{SUBJECT_PREFIX}.{self.service}.{self.name}.*.{id_token(job_id)}"

    def delay_subject(self, job_id: str) -> str:
        """Where a delayed job's `@at` schedule waits."""
        return f"{SUBJECT_PREFIX}.{self.service}.{self.name}.delay.{id_token(job_id)}"

    def schedule_subject(self, schedule: str) -> str:
        """Where a recurring schedule of this kind is kept."""
        return f"{SUBJECT_PREFIX}.{self.service}.{self.name}.schedule.{schedule}"

    def consumer(self, priority: str) -> str:
        """The durable consumer of one priority, shared by the kind's workers."""
        return f"job_{self.service}_{self.name}_{priority}"

    def status_key(self, job_id: str) -> str:
        """A job's key in the `jobs` bucket."""
        return f"{self.service}.{self.name}.{id_token(job_id)}"

    @property
    def key_filter(self) -> str:
        """The bucket keys of every job of this kind."""
        return f"{self.service}.{self.name}.*"

    @property
    def cancel_subject(self) -> str:
        """Where cancel notices for this kind's running jobs go."""
        return f"{CANCEL_PREFIX}.{self.service}.{self.name}"


_kinds: dict[str, Kind] = {}


def priority_of(subject: str) -> str:
    """The priority token of a queued job's subject (`jobs.<s>.<n>.<priority>.<id>`)."""
    parts = subject.split(".", 4)
    return parts[3] if len(parts) > 4 else ""


def id_token(job_id: str) -> str:
    """A job id as one subject token and key part: itself when it fits, else a hash."""
    if _TOKEN.match(job_id):
        return job_id
    return "h_" + hashlib.sha256(job_id.encode()).hexdigest()[:40]


def check_job_id(job_id: str) -> str:
    """Ids end up in subjects, keys and logs: 1-128 letters, digits or ._:@/+=-."""
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise BadRequest(f"invalid job id {job_id!r}: use 1-128 letters, digits or ._:@/+=-")
    return job_id


def check_priority(priority: str) -> Priority:
    """A priority from user input, or `BadRequest` naming the valid ones."""
    if priority not in PRIORITIES:
        raise BadRequest(f"invalid priority {priority!r}: one of {', '.join(PRIORITIES)}")
    return priority


def check_schedule_name(name: str) -> str:
    """A schedule name from user input: one subject token."""
    if not isinstance(name, str) or not _SCHEDULE_NAME.match(name):
        raise InvalidName(
            f"invalid schedule name {name!r}: 1-64 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return name


PREDEFINED = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})  # fmt: skip


def normalize_spec(cron: str | None = None, every: float | str | None = None) -> str:
    """The `Nats-Schedule` value: `@every <duration>`, a predefined `@hourly`-like
    name, or a cron expression (a 5-field one gets a leading `0` for seconds)."""
    if (cron is None) == (every is None):
        raise BadRequest("give exactly one of cron= or every=")
    if every is not None:
        if isinstance(every, str):
            return f"@every {every.strip()}"
        if every < 1:
            raise BadRequest(f"every must be at least 1 second, got {every:g}")
        return f"@every {every:g}s"
    assert cron is not None
    text = " ".join(cron.split())
    if text.startswith("@"):
        if text in PREDEFINED or text.startswith("@every "):
            return text
        raise BadRequest(f"unknown schedule {cron!r}: use {', '.join(sorted(PREDEFINED))}")
    fields = text.split(" ")
    if len(fields) == 5:
        return "0 " + text
    if len(fields) != 6:
        raise BadRequest(f"invalid cron {cron!r}: expected 5 or 6 fields (seconds first)")
    return text


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*(ms|s|m|h)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MIN_WINDOW = 0.1  # seconds: shorter windows would cost a counter key per few jobs


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `count` job starts per `per` seconds, across every replica of the kind.

    Kept as fixed windows of `window` seconds allowing `allowance` starts each (the
    finest split with windows of at least `MIN_WINDOW`), so `5/s` is one start per
    0.2 s window: starts are spread out, not bunched at the top of each second.
    """

    count: int
    per: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """'20/s', '600/m', '5/10s', ... (`ValueError` otherwise)."""
        match = _RATE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"invalid rate_limit {text!r}: expected e.g. '20/s', '600/m', '5/10s'")
        count, amount, unit = int(match.group(1)), match.group(2), match.group(3)
        per = (float(amount) if amount else 1.0) * _UNIT[unit]
        if count < 1 or per <= 0:
            raise ValueError(f"invalid rate_limit {text!r}: count and period must be positive")
        return cls(count, per)

    @property
    def allowance(self) -> int:
        """Starts each window allows."""
        return max(1, math.ceil(MIN_WINDOW * self.count / self.per))

    @property
    def window(self) -> float:
        """Seconds per window."""
        return self.allowance * self.per / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.per:g}s"


@dataclass(frozen=True, slots=True)
class JobOptions:
    """A kind's worker settings, checked when the handler is declared."""

    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    timeout: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff: tuple[float, ...] = DEFAULT_BACKOFF
    rate_limit: RateLimit | None = None
    schedule: str | None = None
    schedule_payload: Any = None
    ack_wait: float = DEFAULT_ACK_WAIT

    @classmethod
    def build(
        cls,
        *,
        max_concurrency: int,
        timeout: float | None,
        max_attempts: int,
        backoff: Sequence[float],
        rate_limit: str | RateLimit | None,
        schedule: str | None,
        schedule_payload: Any,
        ack_wait: float,
    ) -> JobOptions:
        """Checked options (`ValueError` for a bad value, at declaration time)."""
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be at least 1")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None for no limit)")
        if ack_wait < 1:
            raise ValueError("ack_wait must be at least 1 second")
        delays = tuple(float(d) for d in backoff) or (0.0,)
        if any(d < 0 for d in delays):
            raise ValueError("backoff delays must not be negative")
        limit = RateLimit.parse(rate_limit) if isinstance(rate_limit, str) else rate_limit
        if schedule is not None:
            try:
                schedule = normalize_spec(cron=schedule)
            except BadRequest as exc:
                raise ValueError(exc.message) from None
        return cls(
            max_concurrency, timeout, max_attempts, delays, limit, schedule, schedule_payload,
            ack_wait,
        )  # fmt: skip

    def backoff_for(self, attempt: int) -> float:
        """The delay before the attempt after `attempt` (the last value repeats)."""
        return self.backoff[min(attempt - 1, len(self.backoff) - 1)]
