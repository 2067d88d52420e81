"""`JobContext`: what a job handler gets besides its payload.

A `Context` (so `job.call` and `job.publish` carry the correlation id and the trace
onward, with the job as their cause) plus the job's id, kind, attempt and
`progress()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from ..context import Context

if TYPE_CHECKING:
    from ..client import Client
    from .run import RunningJob

__all__ = ["JobContext"]


class JobContext(Context):
    """Per-attempt state of a job handler: ids, attempt, progress, log, onward calls."""

    __slots__ = ("_run", "job_id", "kind", "max_attempts")

    def __init__(
        self,
        client: Client,
        run: RunningJob,
        *,
        service: str,
        handler: str,
        subject: str,
        correlation_id: str,
        causation_id: str | None,
        attempt: int,
        max_attempts: int,
        headers: Mapping[str, str] | None,
        span: trace.Span = trace.INVALID_SPAN,
    ) -> None:
        super().__init__(
            client,
            service=service,
            handler=handler,
            subject=subject,
            correlation_id=correlation_id,
            causation_id=causation_id,
            attempt=attempt,
            headers=headers,
            span=span,
        )
        self._run = run
        self.job_id: str = run.status.id
        self.kind: str = run.status.kind
        self.max_attempts = max_attempts

    @property
    def message_id(self) -> str | None:
        """Calls, events and jobs sent from a job name the job as their cause."""
        return self.job_id

    @property
    def log(self) -> Any:
        """The context's logger, also bound with the job id and kind."""
        if self._log is None:
            base = Context.log.fget(self)  # type: ignore[attr-defined]
            self._log = base.bind(job_id=self.job_id, kind=self.kind)
        return self._log

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the job is (0.0-1.0) and what it does now.

        Cheap to call often: at most one write per 0.2 s reaches the status record
        (the newest report wins); watchers see it within that time.
        """
        if self._run.report(fraction, message):
            await self._run.flush()

    @property
    def cancelled(self) -> bool:
        """True once the job was cancelled (the handler is being cancelled too)."""
        return self._run.stopped_by is not None


def read_job_signature(fn: Any) -> Any:
    """A job handler's signature; its context parameter may be typed `JobContext` or
    plain `Context` (it gets a `JobContext` either way)."""
    import typing

    from ..transport.signature import read_signature

    hints = typing.get_type_hints(fn) if callable(fn) else {}
    plain = any(hint is Context for name, hint in hints.items() if name != "return")
    return read_signature(fn, Context if plain else JobContext)
