"""Job counts for `$SRV.STATS` and the OpenTelemetry metrics API.

Besides the handler instruments every handler feeds (`mesh.handler.handled`,
`failed`, `duration` and `in_flight`, with `kind="job"`), each worker reports, per
job kind (attribute `job.kind`):

| instrument              | type                        | unit    |
| ----------------------- | --------------------------- | ------- |
| `mesh.job.succeeded`    | observable counter          | `{job}` |
| `mesh.job.failed`       | observable counter          | `{job}` |
| `mesh.job.retried`      | observable counter          | `{job}` |
| `mesh.job.cancelled`    | observable counter          | `{job}` |
| `mesh.job.running`      | observable up-down counter  | `{job}` |
| `mesh.job.queued`       | observable gauge            | `{job}` |

`mesh.job.queued` is the queue depth (also per `priority`), read from the consumers
when `$SRV.STATS` is asked and updated with each delivery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

__all__ = ["JobCounts", "track", "untrack"]


class JobCounts:
    """What happened to a kind's jobs on this worker since it started."""

    __slots__ = ("cancelled", "dead_lettered", "failed", "kind", "queued", "retried",
                 "running", "skipped", "succeeded")  # fmt: skip

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.cancelled = 0
        self.dead_lettered = 0
        self.skipped = 0  # deliveries not run: duplicates, cancelled or finished jobs
        self.running = 0
        self.queued: dict[str, int] = {}  # per priority, as the consumers last said

    def as_dict(self) -> dict[str, object]:
        """The counts as `$SRV.STATS` endpoint data."""
        return {
            "queued": sum(self.queued.values()),
            "queued_by_priority": dict(self.queued),
            "running": self.running,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retried": self.retried,
            "cancelled": self.cancelled,
            "dead_lettered": self.dead_lettered,
            "skipped": self.skipped,
        }


_tracked: dict[int, JobCounts] = {}


def track(counts: JobCounts) -> None:
    """Report a started worker's counts at each metrics collection."""
    _tracked[id(counts)] = counts


def untrack(counts: JobCounts) -> None:
    """Stop reporting a stopped worker's counts."""
    _tracked.pop(id(counts), None)


def _observe(
    read: Callable[[JobCounts], int],
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(read(c), {"job.kind": c.kind}) for c in list(_tracked.values())]

    return observe


def _observe_queued(options: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(depth, {"job.kind": c.kind, "priority": priority})
        for c in list(_tracked.values())
        for priority, depth in list(c.queued.items())
    ]


_meter = metrics.get_meter("framework")
for _name, _read, _what in (
    ("succeeded", lambda c: c.succeeded, "Jobs that succeeded"),
    ("failed", lambda c: c.failed, "Jobs that failed for good (dead-lettered)"),
    ("retried", lambda c: c.retried, "Failed attempts that will be retried"),
    ("cancelled", lambda c: c.cancelled, "Running jobs cancelled"),
):
    _meter.create_observable_counter(
        f"mesh.job.{_name}", [_observe(_read)], unit="{job}", description=_what
    )
_meter.create_observable_up_down_counter(
    "mesh.job.running", [_observe(lambda c: c.running)], unit="{job}", description="Jobs running"
)
_meter.create_observable_gauge(
    "mesh.job.queued",
    [_observe_queued],
    unit="{job}",
    description="Jobs waiting in a kind's queue, per priority",
)
