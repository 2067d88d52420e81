"""A job kind's workers in one service replica: consumers, pulling, lifecycle, stats.

Started and stopped with its service like a subscriber, listed in `$SRV.INFO` (with
the payload and result schemas) and `$SRV.STATS` (with the job counts). Replicas of
the service share the kind's three durable pull consumers (one per priority), so each
job goes to one of them. At most `max_concurrency` handlers run at once here; the
puller takes no more messages than the worker can start soon (nor any while too many
successes wait for their records, `settle`). Long handlers keep
their messages with in-progress acks (every third of `ack_wait`), so `ack_wait` is
only how long a crashed worker's job waits before another worker takes it over.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from nats.js import api
from nats.js.errors import NotFoundError

from ..errors import ConfigConflict
from ..events.pull import hand_back_now
from ..observability import metrics as handler_metrics
from ..observability.logging import get_logger
from ..streams import deadletter_stream, differences, ensure_stream
from ..transport import wire
from ..transport.codec import encode_payload, schema_json
from ..transport.dispatch import WorkerPool
from ..transport.signature import NO_PAYLOAD, Handler, HandlerSignature
from . import metrics
from .backend import Backend
from .declare import ensure_rate_stream
from .kinds import KindInfo
from .metrics import JobCounts
from .options import JOBS_STREAM, PRIORITIES, JobOptions, Kind
from .process import Processor
from .puller import Puller
from .ratelimit import RateLimiter
from .run import CLAIM_DELAY, PROGRESS_INTERVAL
from .schedule import sync_code_schedule
from .settle import Settler
from .status import utcnow

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["JobWorker"]

_log = get_logger("framework.jobs")

CAPACITY_EXTRA = 0.5  # messages held beyond max_concurrency, as a share of it
SETTLING_MIN = 64  # finished jobs whose outcome is being recorded, at least allowed


class JobWorker:
    """The handler object of `@service.job(...)`: one per (service, job name)."""

    kind = "job"  # what discovery and the handler metrics call this kind of handler

    def __init__(
        self,
        service: str,
        name: str,
        fn: Handler,
        signature: HandlerSignature,
        options: JobOptions,
        *,
        version: str = "",
    ) -> None:
        self.service = service
        self.name = name
        self.job_kind = Kind(service, name)
        self.fn = fn
        self.signature = signature
        self.options = options
        self.version = version
        self.subject = f"jobs.{service}.{name}.*"
        self.queue_group = f"job_{service}_{name}"
        self.stats = handler_metrics.stats_for(service, name, "job")
        self.counts = JobCounts(str(self.job_kind))
        self.capacity = options.max_concurrency + max(
            1, int(options.max_concurrency * CAPACITY_EXTRA)
        )
        self.settling = max(SETTLING_MIN, 4 * self.capacity)  # outcomes being recorded
        self.instance_id = ""
        self._client: Client | None = None
        self._processor: Processor | None = None
        self._pool: WorkerPool | None = None
        self._task_group: TaskGroup | None = None
        self._settler: Settler | None = None
        self._puller: Puller | None = None
        self._cancel_sub: Any = None
        self._scope: anyio.CancelScope | None = None
        self._taken = 0
        self._active: dict[int, tuple[Any, float]] = {}
        self._stopping = False

    def __repr__(self) -> str:
        return f"JobWorker({str(self.job_kind)!r})"

    # -- discovery -------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """`$SRV.INFO` endpoint metadata: kind, settings, payload and result schemas."""
        meta = {
            "kind": "job",
            "job_kind": str(self.job_kind),
            "stream": JOBS_STREAM,
            "max_concurrency": str(self.options.max_concurrency),
            "max_attempts": str(self.options.max_attempts),
            "payload_schema": self._schema(self.signature.payload_type),
            "result_schema": self._schema(self.signature.returns),
        }
        if self.options.timeout is not None:
            meta["timeout"] = f"{self.options.timeout:g}"
        if self.options.rate_limit is not None:
            meta["rate_limit"] = str(self.options.rate_limit)
        if self.options.schedule is not None:
            meta["schedule"] = self.options.schedule
        return meta

    @staticmethod
    def _schema(tp: Any) -> str:
        return "null" if tp is NO_PAYLOAD or tp is None else schema_json(tp)

    def extra_stats(self) -> dict[str, Any]:
        """`$SRV.STATS` endpoint data: the job counts and jobs in flight."""
        return {**self.counts.as_dict(), "in_flight": self.stats.in_flight}

    def kind_info(self) -> KindInfo:
        """The record clients validate payloads with (`jobs_kinds` bucket)."""
        import json

        takes = self.signature.payload_type is not NO_PAYLOAD
        return KindInfo(
            kind=str(self.job_kind),
            service_version=self.version,
            takes_payload=takes,
            payload_schema=json.loads(self._schema(self.signature.payload_type)) if takes else None,
            result_schema=json.loads(self._schema(self.signature.returns)),
            max_attempts=self.options.max_attempts,
            timeout=self.options.timeout,
            rate_limit=str(self.options.rate_limit) if self.options.rate_limit else "",
            schedule=self.options.schedule or "",
            updated_at=utcnow(),
        )

    async def refresh_stats(self) -> None:
        """Queue depth per priority, from the consumers (asked when STATS is asked)."""
        if self._client is None:
            return
        for priority in PRIORITIES:
            info = await self._client.js.consumer_info(
                JOBS_STREAM, self.job_kind.consumer(priority), timeout=0.5
            )
            self.counts.queued[priority] = info.num_pending or 0

    # -- lifecycle -------------------------------------------------------------------

    def consumer_config(self, priority: str) -> api.ConsumerConfig:
        """The durable consumer of one priority of this kind."""
        return api.ConsumerConfig(
            durable_name=self.job_kind.consumer(priority),
            description=f"{priority} priority jobs of {self.job_kind}",
            filter_subject=self.job_kind.queue(priority) + ".*",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.options.ack_wait,
            # one more than attempts: an attempt that crashed its worker is failed next
            max_deliver=self.options.max_attempts + 1,
            max_ack_pending=max(1000, 4 * self.options.max_concurrency),
            max_waiting=512,
        )

    async def _ensure_consumer(self, client: Client, priority: str) -> None:
        declared = self.consumer_config(priority)
        try:
            info = await client.js.consumer_info(JOBS_STREAM, declared.durable_name)
        except NotFoundError:
            await client.js.add_consumer(JOBS_STREAM, declared)
            return
        fixed = ["filter_subject", "ack_policy", "deliver_policy"]
        tunable = ["ack_wait", "max_deliver", "max_ack_pending"]
        diff = differences(info.config, declared, fixed + tunable)
        conflicts = {k: v for k, v in diff.items() if k in fixed}
        if conflicts:
            raise ConfigConflict(f"consumer {JOBS_STREAM}/{declared.durable_name}", conflicts)
        if diff:
            await client.js.add_consumer(JOBS_STREAM, declared)
            _log.warning("job consumer updated", consumer=declared.durable_name, changes=diff)

    async def prepare(self, client: Client) -> None:
        """Stream, consumers, buckets, kind record and code schedule, before any job runs."""
        self._client = client
        self.stats.reset()
        backend = await Backend.of(client)
        await ensure_stream(client, deadletter_stream(), strict=False)
        if self.options.rate_limit is not None:
            await ensure_rate_stream(client)
        for priority in PRIORITIES:
            await self._ensure_consumer(client, priority)
        await backend.kinds.register(self.kind_info())
        body = encode_payload(self.options.schedule_payload)
        await sync_code_schedule(client, self.job_kind, self.options.schedule, body)

    async def start(self, client: Client, task_group: TaskGroup) -> None:
        """Start pulling and running jobs (after `prepare`)."""
        backend = await Backend.of(client)
        limit = self.options.rate_limit
        self._processor = Processor(
            client,
            backend.store,
            self.job_kind,
            self.fn,
            self.signature,
            self.options,
            worker_id=self.instance_id or client.name or "worker",
            stats=self.stats,
            counts=self.counts,
            limiter=RateLimiter(await client.mux(), self.job_kind, limit) if limit else None,
            barrier=backend.barrier,
        )
        self._stopping = False
        self._taken = 0
        self._settler = Settler(
            backend.store,
            task_group,
            self._processor.recorded,
            self._settled,
            retry_after=self.options.backoff[0],
        )
        self._processor.settler = self._settler
        self._pool = WorkerPool(
            self._handle, self.options.max_concurrency, queue=self.capacity + len(PRIORITIES)
        )
        self._pool.start(task_group)
        self._task_group = task_group
        # notices are handled as they are read (no task hop), before any job is pulled
        self._cancel_sub = await wire.subscribe_inline(
            client.nc, self.job_kind.cancel_subject, self._on_cancel
        )
        consumers = [self.job_kind.consumer(p) for p in PRIORITIES]
        self._puller = Puller(
            client.nc, JOBS_STREAM, consumers, PRIORITIES, self._hand_over, self._free
        )
        await self._puller.start()
        self._scope = anyio.CancelScope()
        task_group.start_soon(self._run_loops)
        handler_metrics.track(self)
        metrics.track(self.counts)

    async def _run_loops(self) -> None:
        assert self._scope is not None and self._puller is not None
        with self._scope:
            async with anyio.create_task_group() as loops:
                loops.start_soon(self._puller.run)
                loops.start_soon(self._keep_alive_loop)
                loops.start_soon(self._progress_loop)

    async def stop(self, grace: float) -> bool:
        """Stop taking jobs; running ones get `grace` seconds, then are cancelled and
        handed back (another replica runs them as their next attempt)."""
        handler_metrics.untrack(self)
        metrics.untrack(self.counts)
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        if self._puller is not None:
            await self._puller.stop(min(grace, 5.0))
        finished = True
        if self._pool is not None:
            finished = await self._pool.close(grace)
        if self._settler is not None:  # outcomes being recorded: their acks
            finished = await self._settler.wait(min(grace, 5.0)) and finished
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
            self._cancel_sub = None
        return finished

    # -- taking and handling ---------------------------------------------------------

    def _free(self) -> int:
        if self._stopping or (self._settler is not None and self._settler.pending >= self.settling):
            return 0
        return self.capacity - self._taken

    def _hand_over(self, msg: Any) -> None:
        """A delivery, as it is read: to the pool, whose queue holds all the puller
        takes (`capacity` and a long pull's message per priority), so it is refused
        only while stopping (then handed back at once) or after a pull answered very
        late (then queued from a task)."""
        # every slot taken: the job is held until one frees (and is started only once
        # every cancel notice sent before then has been read: `Processor.process`)
        assert self._pool is not None and self._processor is not None
        held = self._taken >= self.options.max_concurrency
        taken = (msg, self._processor.mark() if held else None)
        self._taken += 1
        self._active[id(msg)] = (msg, time.monotonic())
        if self._pool.offer(taken):
            return
        if self._stopping or self._task_group is None:
            self._taken -= 1
            self._active.pop(id(msg), None)
            hand_back_now(msg)  # another replica takes it now, not after ack_wait
            return
        self._task_group.start_soon(self._pool.submit, taken)

    async def _handle(self, taken: tuple[Any, int | None]) -> None:
        assert self._processor is not None
        msg, held_since = taken
        self.stats.in_flight += 1
        handed = False
        try:
            if self._stopping:
                await msg.nak()  # another replica takes it now, not after ack_wait
                return
            handed = await self._processor.process(msg, held_since)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                with contextlib.suppress(Exception):
                    await msg.nak()  # stopped past the grace period: the next attempt
            raise
        except Exception as exc:  # never lose the worker; the job comes back later
            _log.error("job not settled, will retry", kind=str(self.job_kind), error=str(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.options.backoff[0])
        finally:
            self.stats.in_flight -= 1
            if not handed:  # else kept alive until the settler is done with it
                self._active.pop(id(msg), None)
            self._taken -= 1
            if self._puller is not None:
                self._puller.wake()

    def _settled(self, msg: Any) -> None:
        self._active.pop(id(msg), None)
        if self._puller is not None:
            self._puller.wake()

    def _on_cancel(self, msg: Any) -> None:
        """A cancel notice, handled in the connection's read loop as it is read."""
        if self._processor is not None:
            job_id, *numbers = msg.data.decode("utf-8", "replace").split(" ")
            revision, seq = ([int(n) if n.isdigit() else 0 for n in numbers] + [0, 0])[:2]
            self._processor.cancelled(job_id, revision, seq)

    async def _keep_alive_loop(self) -> None:
        """In-progress acks, so a job outliving `ack_wait` is not handed to another worker."""
        every = max(0.1, self.options.ack_wait / 3)
        while True:
            await anyio.sleep(every / 2)
            now = time.monotonic()
            for key, (msg, touched) in list(self._active.items()):
                if now - touched >= every and key in self._active:
                    self._active[key] = (msg, now)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    async def _progress_loop(self) -> None:
        """Writes `running` for handlers busy longer than `CLAIM_DELAY`, and progress
        reports that came faster than one per interval."""
        while True:
            await anyio.sleep(CLAIM_DELAY)
            if self._processor is not None:
                now = time.monotonic()
                for run in list(self._processor.running.values()):
                    waited = now - run.last_write >= PROGRESS_INTERVAL or not run.claimed
                    if run.due and waited:
                        await run.flush()
