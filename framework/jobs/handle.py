"""`JobHandle`: what `enqueue` returns and `client.job(kind, id)` makes for any job."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import msgspec

from ..errors import DeadlineExceeded, NotFound, ServiceError
from ..transport.codec import DECODE_ERRORS, decode
from .backend import Backend
from .control import cancel_job, retry_job
from .errors import JobCancelled, JobFailed
from .messages import supersedes
from .options import Kind, check_job_id
from .status import JobStatus, presented
from .store import Entry

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["JobHandle"]

T = TypeVar("T")


class JobHandle(Generic[T]):
    """A job by kind and id: its status, its changes as they happen, its result.

    Cheap to make (no I/O until a method is called); `returns` is the type
    `result()` decodes the job's result to (`Any`: the plain JSON value).
    """

    def __init__(self, client: Client, kind: str, job_id: str, returns: Any = Any) -> None:
        parsed = Kind.parse(kind)
        self._kind = parsed
        self.kind = str(parsed)
        self.id = check_job_id(job_id)
        self._client = client
        self._returns = returns
        self._key = parsed.status_key(job_id)

    @classmethod
    def known(cls, client: Client, kind: Kind, job_id: str, returns: Any = Any) -> JobHandle[T]:
        """A handle to a job just enqueued: kind and id are checked already."""
        handle: JobHandle[T] = cls.__new__(cls)
        handle._kind, handle.kind, handle.id = kind, str(kind), job_id
        handle._client, handle._returns = client, returns
        handle._key = kind.status_key(job_id)
        return handle

    def __repr__(self) -> str:
        return f"JobHandle({self.kind!r}, {self.id!r})"

    async def status(self) -> JobStatus:
        """The job's status now; `NotFound` when there is no such job (or it expired)."""
        backend = await Backend.of(self._client)
        status = await backend.current(self._kind, self.id)
        if status is None:
            raise NotFound(f"no job {self.kind}/{self.id}")
        return presented(status)

    async def watch(self) -> AsyncIterator[JobStatus]:
        """The status now, then every change, until a final state (a key watch: the
        server pushes each change, nothing polls). `NotFound` if there is no such job."""
        backend = await Backend.of(self._client)
        updates = backend.store.watch(self._key)
        try:
            first = True
            async for entry in updates:
                status = entry.status
                if first:
                    first = False
                    status = await self._first(backend, entry)
                    if status is None:
                        continue  # changed since the watch began: the change comes next
                elif status is None:
                    return  # deleted (retention ran out)
                yield presented(status)
                if status.final:
                    return
        finally:
            with contextlib.suppress(Exception):
                await updates.aclose()  # type: ignore[attr-defined]

    async def _first(self, backend: Backend, entry: Entry) -> JobStatus | None:
        """The status as the watch began: the record, or the job's message when it is
        queued without one; None when the record changed meanwhile (the watch has it)."""
        if entry.status is not None and not entry.status.final:
            return entry.status
        message = await backend.messages.find(self._kind, self.id)
        if message is not None and supersedes(message, entry.status):
            return await backend.from_message(self._kind, self.id, message)
        now = await backend.store.get(self._key)
        if now.revision != entry.revision and now.status is not None:
            return None
        if entry.status is None:
            raise NotFound(f"no job {self.kind}/{self.id}")
        return entry.status

    async def result(self, timeout: float | None = None) -> T:
        """Wait for the job to finish and return its result, decoded to `returns`.

        Raises `JobFailed` or `JobCancelled` (with the final status), `NotFound`, or
        `DeadlineExceeded` when `timeout` seconds pass first (the job goes on).
        """
        last: JobStatus | None = None
        with anyio.move_on_after(timeout if timeout is not None else float("inf")) as scope:
            async for status in self.watch():
                last = status
        if last is not None and last.final:
            return self._outcome(last)
        if scope.cancelled_caught:
            state = last.state if last is not None else "unknown"
            raise DeadlineExceeded(
                f"job {self.kind}/{self.id} not finished within {timeout:g}s (it is {state})",
                service=self.kind.partition(".")[0],
            )
        raise NotFound(f"job {self.kind}/{self.id} is gone before it finished")

    def _outcome(self, status: JobStatus) -> T:
        if status.state == "failed":
            raise JobFailed(status)
        if status.state == "cancelled":
            raise JobCancelled(status)
        if self._returns is Any:
            return status.result  # type: ignore[no-any-return]
        if self._returns is None:
            return None  # type: ignore[return-value]
        try:
            result: T = decode(msgspec.json.encode(status.result), self._returns)
        except DECODE_ERRORS as exc:
            raise ServiceError(
                502, f"result of job {self.kind}/{self.id} is not a {self._returns}: {exc}"
            ) from None
        return result

    async def cancel(self) -> bool:
        """Cancel the job: True if this cancelled it, False if it had already finished
        (then nothing changes). A running handler is cancelled within a second."""
        return await cancel_job(self._client, self.kind, self.id)

    async def retry(self) -> JobHandle[T]:
        """Queue a failed or cancelled job again (attempt 1, same payload and id)."""
        await retry_job(self._client, self.kind, self.id)
        return self
