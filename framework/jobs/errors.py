"""How a job's end reaches the code waiting for its result: typed errors.

They are `ServiceError`s like every error of the framework, so code that handles a
failed call handles a failed job the same way; each carries the job's final status.
"""

from __future__ import annotations

from ..errors import ServiceError
from .status import JobStatus

__all__ = ["JobCancelled", "JobFailed", "JobsUnsupported"]


class JobFailed(ServiceError):
    """The job ended `failed`: attempts exhausted, rejected or undecodable (code 500)."""

    def __init__(self, status: JobStatus) -> None:
        attempts = f" after {status.attempt} attempt{'s' if status.attempt != 1 else ''}"
        super().__init__(
            500,
            f"job {status.kind}/{status.id} failed{attempts}: {status.error or 'no error given'}",
            service=status.kind.partition(".")[0],
        )
        self.status = status


class JobCancelled(ServiceError):
    """The job was cancelled before it finished (code 409)."""

    def __init__(self, status: JobStatus) -> None:
        super().__init__(
            409,
            f"job {status.kind}/{status.id} was cancelled",
            service=status.kind.partition(".")[0],
        )
        self.status = status


class JobsUnsupported(ServiceError):
    """The server lacks what jobs need (JetStream message schedules, counters): 501."""

    def __init__(self, message: str) -> None:
        super().__init__(501, message)
