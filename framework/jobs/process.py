"""One delivered job message: decide, claim, run, and settle it.

1. Decide whether to run it. A first delivery of a job queued at once (not from a
   schedule, not a replay) runs without a read: the message carries the revision of
   the record it was queued at (`Job-Revision`, 0 for a job queued without a record,
   see `messages`), and every write of this attempt is compare-and-set against it; a
   job cancelled since is known from the cancel notice (or from that write failing).
   Any other delivery reads the job's record and runs only if the job still waits for
   this message: queued, scheduled or retrying; `running` by this very message (a
   redelivery after a worker died: the next attempt); `failed` when the message is a
   dead-letter replay; no record, or a finished record of an earlier run when the
   message was queued without one. A finished or cancelled job, or a duplicate message
   of a job already running, is acked without running anything: the record is the
   effectively-once bookkeeping.
2. Wait for the kind's rate limit, then claim: the read path writes `running` with
   the attempt (the delivery count), the worker and the message's stream sequence,
   compare-and-set; the first-delivery path defers that write (`run.CLAIM_DELAY`), so
   a short job is recorded once, with its outcome.
3. Run the handler in its own cancel scope (a cancel notice or a changed record stops
   it) under the kind's `timeout`.
4. Settle: success writes `succeeded` with the result, then acks; a failure writes
   `retrying` and naks with the backoff delay, or, on the last attempt, copies the
   message to `DEADLETTER`, writes `failed` and terminates it. `Reject` and an
   undecodable payload fail at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ..errors import BadRequest, PublishError, Reject
from ..events.deadletter import REPLAY_OF, send_to_dead_letter
from ..observability import tracing as telemetry
from ..observability.logging import get_logger
from ..transport import headers as h
from ..transport.codec import DECODE_ERRORS, decoder_for
from ..transport.names import ack_fields
from ..transport.signature import NO_PAYLOAD, Handler, HandlerSignature
from .barrier import ReadBarrier
from .context import JobContext
from .control import JOB_ID, JOB_REVISION, JOB_SCHEDULE
from .messages import parse_revision
from .metrics import JobCounts
from .options import JOBS_STREAM, JobOptions, Kind, check_job_id, priority_of
from .ratelimit import RateLimiter
from .run import RunningJob
from .status import WAITING_STATES, JobStatus, encode_status, utcnow
from .store import Conflict, StatusStore

if TYPE_CHECKING:
    from ..client import Client
    from ..observability.stats import HandlerStats
    from .settle import Settler

__all__ = ["Delivery", "Processor"]

_log = get_logger("framework.jobs")

CLAIM_TRIES = 5
CANCELLED_KEPT = 10_000  # cancel notices remembered (a message already held, not yet run)
SCHEDULER = "Nats-Scheduler"  # on messages a schedule produced (delayed or recurring)
_STOPPED: Any = object()


class Delivery(msgspec.Struct):
    """What the ack subject of a delivery says: attempt, stream sequence, store time."""

    attempt: int
    sequence: int
    stored_ns: int

    @classmethod
    def of(cls, msg: Any) -> Delivery:
        """Read from the ack subject (nats-py's `metadata` only when it has another form)."""
        fields = ack_fields(msg.reply)
        if fields is not None:
            try:
                return cls(int(fields[2]), int(fields[3]), int(fields[5]))
            except ValueError:
                pass
        meta = msg.metadata
        return cls(meta.num_delivered, meta.sequence.stream, int(meta.timestamp.timestamp() * 1e9))


def earlier_run(status: JobStatus | None, revision: int | None, delivery: Delivery) -> bool:
    """A finished record of an earlier run of the id, for a message queued without one."""
    return revision == 0 and status is not None and status.final and status.seq < delivery.sequence


def should_run(status: JobStatus | None, delivery: Delivery, replay: bool) -> bool:
    """Whether this delivery is the job's to run (see the module's step 1); `status`
    is None for no record, or a record of an earlier run (`earlier_run`)."""
    if status is None:
        return True  # a recurring firing, or a record gone past retention
    if status.state in WAITING_STATES:
        return True
    if status.state == "running":
        return status.seq == delivery.sequence  # else a duplicate of a running job
    return status.state == "failed" and replay


class Processor:
    """Runs a kind's deliveries; shared by the worker's pool tasks."""

    def __init__(
        self,
        client: Client,
        store: StatusStore,
        kind: Kind,
        fn: Handler,
        signature: HandlerSignature,
        options: JobOptions,
        *,
        worker_id: str,
        stats: HandlerStats,
        counts: JobCounts,
        limiter: RateLimiter | None,
        barrier: ReadBarrier | None = None,
    ) -> None:
        """`barrier`: the connection's, which the cancel notices come on (None: a held
        job's record is read before it starts instead)."""
        self.client = client
        self.store = store
        self.kind = kind
        self.fn = fn
        self.signature = signature
        self.options = options
        self.worker_id = worker_id
        self.stats = stats
        self.counts = counts
        self.limiter = limiter
        self.barrier = barrier
        self.running: dict[str, RunningJob] = {}
        self.settler: Settler | None = None  # records successes in bursts, when set
        # job id -> (revision of its `cancelled` record, sequence of the message it
        # cancelled, 0 if not said), from cancel notices (bounded)
        self._cancelled: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._decoder = (
            decoder_for(signature.payload_type)
            if signature.payload_type is not NO_PAYLOAD
            else None
        )
        self._span_attributes = telemetry.handler_attributes(
            kind.service, f"jobs.{kind}", f"job_{kind.service}_{kind.name}"
        )

    def cancelled(self, job_id: str, revision: int, seq: int = 0) -> None:
        """A cancel notice: stop the job if it runs here; skip its message if it comes."""
        self._cancelled[job_id] = (revision, seq)
        self._cancelled.move_to_end(job_id)
        while len(self._cancelled) > CANCELLED_KEPT:
            self._cancelled.popitem(last=False)
        run = self.running.get(job_id)
        if run is not None and (not seq or run.status.seq == seq):
            run.stop("cancelled")

    def _cancelled_since(self, job_id: str, revision: int, delivery: Delivery) -> bool:
        """A cancel notice for this message: it names the message, or a record revision
        later than the one the message was queued at."""
        notice = self._cancelled.get(job_id)
        if notice is None:
            return False
        return notice[1] == delivery.sequence or (revision > 0 and notice[0] > revision)

    def mark(self) -> int:
        """What a job that starts to wait for a slot is taken with (`process`)."""
        return self.barrier.mark() if self.barrier is not None else 0

    async def process(self, msg: Any, held_since: int | None = None) -> bool:
        """Decide, claim, run and settle one delivered job message: True when its
        outcome was handed to the settler (which settles the message), else settled.
        `held_since`: the `mark` of when it was taken, if it waited for a slot (a
        cancel notice may have come meanwhile); None if it started at once."""
        delivery = Delivery.of(msg)
        headers: Mapping[str, str] = msg.headers or {}
        try:
            h.check_headers(headers)
            job_id = self._job_id(msg, headers, delivery)
        except BadRequest as exc:
            await self._dead_letter(msg, delivery, "invalid_headers", exc.message, "-")
            await msg.term()
            return False
        run = await self._claim(msg, job_id, delivery, headers, held_since)
        if run is None:
            self.counts.skipped += 1
            await msg.ack()
            return False
        if delivery.attempt > self.options.max_attempts:
            error = "the previous attempt did not finish (its worker stopped or crashed)"
            await self._give_up(run, msg, delivery, "max_attempts", error)
            return False
        self.running[job_id] = run  # from now on a cancel notice reaches it
        try:
            return await self._execute(run, msg, delivery, headers)
        finally:
            if self.running.get(job_id) is run:
                del self.running[job_id]

    def _job_id(self, msg: Any, headers: Mapping[str, str], delivery: Delivery) -> str:
        """`Job-Id`, else the id the subject ends with (an id that is its own token), or
        `<schedule>-<sequence>` for a recurring schedule's firing."""
        job_id = headers.get(JOB_ID)
        if job_id is None:
            schedule = headers.get(JOB_SCHEDULE)
            if schedule:
                job_id = f"{schedule}-{delivery.sequence}"
            elif JOB_REVISION in headers:
                job_id = msg.subject.rpartition(".")[2]
            else:
                raise BadRequest("a job message needs a Job-Id (or Job-Schedule) header")
        return check_job_id(job_id)

    # -- claim -----------------------------------------------------------------------

    async def _claim(
        self,
        msg: Any,
        job_id: str,
        delivery: Delivery,
        headers: Mapping[str, str],
        held_since: int | None,
    ) -> RunningJob | None:
        key = self.kind.status_key(job_id)
        limited = self.limiter is None
        queued = parse_revision(headers.get(JOB_REVISION))
        revision = queued[0] if queued is not None else None
        enqueued = self._as_enqueued(job_id, msg, delivery, headers, queued)
        if enqueued is not None:  # the common case: no read; `running` written later
            if self.limiter is not None:  # waiting for its turn, as a held job does
                held_since = self.mark() if held_since is None else held_since
                await self.limiter.acquire()
                limited = True
            if held_since is None or await self._notices_read(held_since):
                if self._cancelled_since(job_id, enqueued[1], delivery):
                    return None  # cancelled after this message was queued: never runs
                status = self._running(enqueued[0], job_id, msg, delivery, headers)
                return RunningJob(self.store, key, status, enqueued[1], claimed=False)
            # the notices may not all be read (connection trouble): the record decides
        for _ in range(CLAIM_TRIES):
            entry = await self.store.get(key)
            current = None if earlier_run(entry.status, revision, delivery) else entry.status
            if not should_run(current, delivery, REPLAY_OF in headers):
                return None
            if not limited and self.limiter is not None:
                await self.limiter.acquire()  # a slot is taken only for a job that runs
                limited = True
            status = self._running(current, job_id, msg, delivery, headers)
            try:
                revision_now = await self.store.put(key, status, entry.revision)
            except Conflict:
                continue  # changed meanwhile (cancelled, claimed): decide again
            return RunningJob(self.store, key, status, revision_now)
        raise RuntimeError(f"job {self.kind}/{job_id}: record kept changing, not claimed")

    async def _notices_read(self, since: int) -> bool:
        """Whether every cancel notice sent before now has been read (and handled: they
        are handled as they are read), on the connection the job was taken on, so
        `_cancelled_since` knows of any cancel that returned while it was held."""
        return self.barrier is not None and await self.barrier.wait(since)

    def _as_enqueued(
        self,
        job_id: str,
        msg: Any,
        delivery: Delivery,
        headers: Mapping[str, str],
        queued: tuple[int, int] | None,
    ) -> tuple[JobStatus, int] | None:
        """The job as `enqueue` queued it, rebuilt from the message, with the revision
        of the record it was queued at (0: none): a first delivery of a job queued at
        once carries all of it, so the claim needs no read; if the record changed
        since, the first write's compare-and-set fails and the record is read then."""
        if queued is None or delivery.attempt != 1 or SCHEDULER in headers:
            return None
        if REPLAY_OF in headers:
            return None
        number, enqueued_ms = queued
        traceparent = headers.get(h.TRACEPARENT, "")
        status = JobStatus(
            kind=str(self.kind),
            id=job_id,
            state="queued",
            priority=priority_of(msg.subject),
            enqueued_at=datetime.fromtimestamp(enqueued_ms / 1000, UTC),
            correlation_id=headers.get(h.CORRELATION_ID) or job_id,
            trace_id=traceparent[3:35] if len(traceparent) >= 35 else "",
            payload=msgspec.Raw(msg.data) if msg.data else None,
        )
        return status, number

    def _running(
        self,
        existing: JobStatus | None,
        job_id: str,
        msg: Any,
        delivery: Delivery,
        headers: Mapping[str, str],
    ) -> JobStatus:
        base = existing or JobStatus(
            kind=str(self.kind),
            id=job_id,
            state="queued",
            priority=priority_of(msg.subject),
            enqueued_at=datetime.fromtimestamp(delivery.stored_ns / 1e9, UTC),
            correlation_id=headers.get(h.CORRELATION_ID) or job_id,
            schedule=headers.get(JOB_SCHEDULE, ""),
            payload=msgspec.Raw(msg.data) if msg.data else None,
        )
        return msgspec.structs.replace(
            base,
            state="running",
            attempt=min(delivery.attempt, self.options.max_attempts),
            max_attempts=self.options.max_attempts,
            progress=0.0,
            message="",
            run_at=None,
            started_at=utcnow(),
            finished_at=None,
            worker=self.worker_id,
            seq=delivery.sequence,
        )

    # -- run -------------------------------------------------------------------------

    async def _execute(
        self, run: RunningJob, msg: Any, delivery: Delivery, headers: Mapping[str, str]
    ) -> bool:
        payload: Any = None
        if self._decoder is not None:
            stored = run.status.payload  # the record is the truth (a re-run may change it)
            body = msgspec.json.encode(stored) if stored is not None else msg.data
            try:
                payload = self._decoder.decode(body)
            except DECODE_ERRORS as exc:
                self.stats.record(0, f"undecodable: {exc}")
                await self._give_up(run, msg, delivery, "undecodable", str(exc))
                return False
        span = self._span(msg, run, delivery)
        ctx = self._context(run, msg, delivery, headers, span)
        token = telemetry.activate(span)
        started = time.perf_counter_ns()
        self.counts.running += 1
        try:
            outcome = await self._outcome(run, payload, ctx)
            return await self._settle(run, msg, delivery, outcome, started)
        finally:
            self.counts.running -= 1
            telemetry.deactivate(token)
            span.end()

    async def _outcome(self, run: RunningJob, payload: Any, ctx: JobContext) -> Any:
        """The handler's result, `_STOPPED` if it was cancelled, or the exception."""
        result: Any = _STOPPED
        try:
            with run.scope:
                if self.options.timeout is None:
                    result = await self.signature.invoke(self.fn, payload, ctx)
                    return result
                with anyio.move_on_after(self.options.timeout) as limit:
                    result = await self.signature.invoke(self.fn, payload, ctx)
                if limit.cancelled_caught:
                    return TimeoutError(f"timed out after {self.options.timeout:g}s")
        except Exception as exc:
            return exc
        return result

    def _context(
        self,
        run: RunningJob,
        msg: Any,
        delivery: Delivery,
        headers: Mapping[str, str],
        span: Any,
    ) -> JobContext:
        return JobContext(
            self.client,
            run,
            service=self.kind.service,
            handler=self.kind.name,
            subject=msg.subject,
            correlation_id=run.status.correlation_id or run.status.id,
            causation_id=headers.get(h.CAUSATION_ID) or None,
            attempt=run.status.attempt,
            max_attempts=self.options.max_attempts,
            headers=headers,
            span=span,
        )

    def _span(self, msg: Any, run: RunningJob, delivery: Delivery) -> Any:
        """CONSUMER span, child of the enqueue's PRODUCER span and linked to it."""
        span = telemetry.start_handler_span(
            f"process jobs.{self.kind}",
            telemetry.SpanKind.CONSUMER,
            self._span_attributes,
            msg.headers,
            link_to_parent=True,
        )
        if span.is_recording():
            span.set_attribute(telemetry.MESSAGE_ID, run.status.id)
            span.set_attribute(telemetry.CONVERSATION_ID, run.status.correlation_id)
            span.set_attribute(telemetry.DELIVERY_ATTEMPT, delivery.attempt)
            span.set_attribute("mesh.job.kind", str(self.kind))
        return span

    # -- settle ----------------------------------------------------------------------

    async def _settle(
        self, run: RunningJob, msg: Any, delivery: Delivery, outcome: Any, started: int
    ) -> bool:
        """Record the outcome and settle the message: True if handed to the settler."""
        elapsed = time.perf_counter_ns() - started
        if outcome is _STOPPED:
            self.stats.record(elapsed, f"{run.stopped_by}")
            await self._stopped(run, msg)
        elif isinstance(outcome, Reject):
            self.stats.record(elapsed, f"rejected: {outcome.reason}")
            await self._give_up(run, msg, delivery, "rejected", outcome.reason)
        elif isinstance(outcome, Exception):
            error = f"{type(outcome).__name__}: {outcome}"
            if not isinstance(outcome, TimeoutError):
                run_log = _log.bind(kind=str(self.kind), job_id=run.status.id)
                run_log.warning("job attempt failed", error=error, attempt=delivery.attempt)
            self.stats.record(elapsed, error)
            await self._failed(run, msg, delivery, error)
        else:
            self.stats.record(elapsed)
            return await self._succeeded(run, msg, delivery, outcome)
        return False

    async def _stopped(self, run: RunningJob, msg: Any) -> None:
        if run.stopped_by == "cancelled":
            self.counts.cancelled += 1
            await msg.ack()  # the record already says cancelled
        # superseded: another attempt has this message now; leave it to that one

    async def _succeeded(self, run: RunningJob, msg: Any, delivery: Delivery, result: Any) -> bool:
        done = msgspec.structs.replace(
            run.status,
            state="succeeded",
            progress=1.0,
            message=run.latest_message,
            result=result,
            error="",
            finished_at=utcnow(),
        )
        try:
            data = encode_status(done)
        except TypeError as exc:  # the result cannot be stored as JSON
            await self._failed(run, msg, delivery, f"result not JSON-encodable: {exc}")
            return False
        if self.settler is not None and run.hand_over():
            self.settler.add(run, done, data, msg)
            return True
        await self.recorded(run, msg, await run.finish(done, data))
        return False

    async def recorded(self, run: RunningJob, msg: Any, written: bool) -> None:
        """A success is recorded (`written`), or the record said not to: ack either way
        when this attempt's is stored or the job was cancelled meanwhile."""
        if written:
            self.counts.succeeded += 1
            await msg.ack()
        elif run.stopped_by == "cancelled":
            self.counts.cancelled += 1
            await msg.ack()

    async def _failed(self, run: RunningJob, msg: Any, delivery: Delivery, error: str) -> None:
        if delivery.attempt >= self.options.max_attempts:
            await self._give_up(run, msg, delivery, "max_attempts", error)
            return
        delay = self.options.backoff_for(delivery.attempt)
        retrying = msgspec.structs.replace(
            run.status,
            state="retrying",
            error=error,
            run_at=utcnow() + timedelta(seconds=delay),
        )
        if await run.finish(retrying):
            self.counts.retried += 1
            await msg.nak(delay=delay)
        elif run.stopped_by == "cancelled":
            await msg.ack()

    async def _give_up(
        self, run: RunningJob, msg: Any, delivery: Delivery, reason: str, error: str
    ) -> None:
        """Dead-letter the message, then record `failed`, then terminate the message."""
        try:
            await self._dead_letter(msg, delivery, reason, error, run.status.id)
        except PublishError as exc:
            _log.error(
                "job dead letter not stored, will retry", job_id=run.status.id, error=str(exc)
            )
            await msg.nak(delay=self.options.backoff[-1])
            return
        failed = msgspec.structs.replace(
            run.status, state="failed", error=error, finished_at=utcnow()
        )
        if await run.finish(failed):
            self.counts.failed += 1
        await msg.term()

    async def _dead_letter(
        self, msg: Any, delivery: Delivery, reason: str, error: str, job_id: str
    ) -> None:
        await send_to_dead_letter(
            self.client,
            service=self.kind.service,
            handler=self.kind.name,
            reason=reason,
            error=error,
            attempts=delivery.attempt,
            subject=msg.subject,
            stream=JOBS_STREAM,
            sequence=delivery.sequence,
            event_id=job_id,
            data=msg.data,
            original_headers=msg.headers,
        )
        self.counts.dead_lettered += 1
        self.stats.dead_lettered += 1
        _log.error(
            "job dead-lettered",
            kind=str(self.kind),
            job_id=job_id,
            reason=reason,
            error=error,
            attempt=delivery.attempt,
        )
