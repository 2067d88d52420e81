"""The jobs view: every job's status record, kept current by a watch of the `jobs` bucket.

A job queued at once has no record until a worker runs it (its message in `JOBS` is its
record until then): those are read every `QUEUED_EVERY` seconds and shown as queued
until their record says more.

Job statuses live in a JetStream key-value bucket (one record per job, rewritten at
every change of state and, coalesced, of progress). The dashboard watches the whole
bucket: the server pushes each change, so a progress bar moves as the worker reports,
with nothing polled. Records are read as the JSON the jobs contract defines (`kind`,
`id`, `state`, `progress`, `message`, `attempt`, `max_attempts`, `error`, times).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from nats.js.errors import BucketNotFoundError, NotFoundError

from ...jobs.messages import JobMessages, message_status
from ...jobs.options import STATUS_BUCKET, Kind, id_token
from ...jobs.status import JOB_STATES
from ...observability.logging import get_logger
from .sampler import Hub

if TYPE_CHECKING:
    from ...client import Client

__all__ = ["JOBS_BUCKET", "STATES", "JobsWatch"]

JOBS_BUCKET = STATUS_BUCKET  # framework.jobs keeps one status record per job here
STATES = JOB_STATES
ACTIVE = ("running", "retrying", "queued", "scheduled")
MAX_TRACKED = 50_000  # records kept for the counts; the oldest finished ones go first
ROWS = 100
RETRY_BUCKET_AFTER = 2.0
QUEUED_EVERY = 1.0  # seconds between reads of the jobs queued without a record yet
MAX_QUEUED = 1000  # of those, read at most
_log = get_logger("framework.web.dashboard")
_FIELDS = (
    "kind", "id", "state", "priority", "progress", "message", "attempt", "max_attempts",
    "error", "enqueued_at", "started_at", "finished_at", "run_at", "worker",
)  # fmt: skip


def _record(data: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None
    if not isinstance(value, dict) or "kind" not in value or "state" not in value:
        return None
    record = {name: value.get(name) for name in _FIELDS}
    run_at = value.get("run_at")
    if record["state"] == "scheduled" and isinstance(run_at, str) and _passed(run_at):
        record["state"] = "queued"  # its schedule fired; the worker has not taken it yet
    record["progress"] = float(record["progress"] or 0.0)
    return record


def _passed(when: str) -> bool:
    try:
        moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return False
    return moment <= datetime.now(UTC)


class JobsWatch:
    """The latest record of each job (bounded), published to the hub as the `jobs` view."""

    def __init__(
        self,
        client: Client,
        hub: Hub,
        *,
        declared: Callable[[], Iterable[str]] = lambda: (),
        min_interval: float = 0.2,
        max_tracked: int = MAX_TRACKED,
    ) -> None:
        self.client = client
        self.hub = hub
        self.declared = declared
        self.min_interval = min_interval
        self.max_tracked = max_tracked
        self.records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.queued: dict[str, dict[str, Any]] = {}  # jobs known by their message only
        self.ready = False
        self._published = 0.0

    async def run(self) -> None:
        """Watch the bucket for as long as the dashboard runs (it may appear later), and
        read the jobs queued without a record every `QUEUED_EVERY` seconds."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._read_queued)
            await self._watch()

    async def _read_queued(self) -> None:
        while True:
            try:
                messages = await JobMessages(await self.client.mux()).scan(limit=MAX_QUEUED)
            except Exception as error:  # no JOBS stream yet, a lost connection
                _log.debug("queued jobs not read", error=str(error))
                messages = []
            queued = {}
            for message in messages:
                _, service, name, _, token = message.subject.split(".", 4)
                job_id = message.headers.get("Job-Id") or token
                status = message_status(Kind(service, name), job_id, message)
                record = _record(msgspec.json.encode(status))
                if record is not None:
                    queued[f"{service}.{name}.{id_token(job_id)}"] = record
            self.queued = queued
            self.publish()
            await anyio.sleep(QUEUED_EVERY)

    def current(self) -> dict[str, dict[str, Any]]:
        """The records, and the queued jobs no record says more about (none, or one of
        an earlier run that finished before the job was queued)."""
        merged = dict(self.records)
        for key, record in self.queued.items():
            known = merged.get(key)
            if known is None or (
                known["state"] in ("succeeded", "failed", "cancelled")
                and str(known.get("finished_at") or "") < str(record.get("enqueued_at") or "")
            ):
                merged[key] = record
        return merged

    async def _watch(self) -> None:
        while True:
            try:
                kv = await self.client.js.key_value(JOBS_BUCKET)
            except (BucketNotFoundError, NotFoundError):
                self.ready = True
                self.publish(force=True)
                await anyio.sleep(RETRY_BUCKET_AFTER)
                continue
            try:
                await self._follow(kv)
            except Exception as error:  # a lost connection: the watch starts again
                _log.debug("jobs watch ended", error=str(error))
                await anyio.sleep(RETRY_BUCKET_AFTER)

    async def _follow(self, kv: Any) -> None:
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None:  # everything stored when the watch began has arrived
                    self.ready = True
                    self.publish(force=True)
                    continue
                self._apply(entry)
                self.publish()
        finally:
            with anyio.CancelScope(shield=True):
                await watcher.stop()

    def _apply(self, entry: Any) -> None:
        key = entry.key
        record = _record(entry.value) if entry.value and entry.operation is None else None
        if record is None:
            self.records.pop(key, None)
            return
        self.records[key] = record
        self.records.move_to_end(key)
        while len(self.records) > self.max_tracked:
            self.records.popitem(last=False)

    def publish(self, *, force: bool = False) -> None:
        """Put the view in the hub, at most every `min_interval` unless `force`."""
        now = time.monotonic()
        if not force and now - self._published < self.min_interval:
            return
        self._published = now
        self.hub.put("jobs", self.view())

    def view(self) -> dict[str, Any]:
        """Counts per kind and state, and the active jobs first, then the newest."""
        counts: dict[str, dict[str, int]] = {kind: {} for kind in self.declared()}
        current = self.current()
        for record in current.values():
            by_state = counts.setdefault(str(record["kind"]), {})
            by_state[record["state"]] = by_state.get(record["state"], 0) + 1
        newest = list(reversed(current.values()))
        active = [r for r in newest if r["state"] in ACTIVE]
        rows = (active + [r for r in newest if r["state"] not in ACTIVE])[:ROWS]
        note = "" if self.ready else "reading the jobs bucket…"
        return {
            "kinds": [{"kind": k, "counts": counts[k]} for k in sorted(counts)],
            "jobs": rows,
            "tracked": len(current),
            "note": note or "No job kinds declared and no jobs in the bucket.",
        }
