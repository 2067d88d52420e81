"""One loop per dashboard that samples the mesh and tells every open page what changed.

Pages never poll: the loop samples once per interval (however many pages are open),
and each page's server-sent event stream waits on the `Hub` for views that changed.
The hub keeps only the latest version of each view, so a slow page skips versions
instead of queueing them: memory does not grow with slow readers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from nats.js.errors import NotFoundError

from ...events.deadletter import list_dead_letters
from ...observability.logging import get_logger
from ...streams import DEADLETTER_STREAM
from ...transport.settings import redact_url
from .traces import recent_traces
from .views import Views, consumer_row, stream_kind

if TYPE_CHECKING:
    from ...client import Client

__all__ = ["DISCOVERY_TIMEOUT", "Hub", "Sampler"]

DISCOVERY_TIMEOUT = 0.25
INFO_EVERY = 10  # samples between full `$SRV.INFO` refreshes (new instances: at once)
DEAD_LETTER_ROWS = 200
_log = get_logger("framework.web.dashboard")


class Hub:
    """The latest version of each view; readers wait for a change."""

    def __init__(self) -> None:
        self.version = 0
        self._views: dict[str, tuple[int, bytes]] = {}
        self._changed = anyio.Event()

    def put(self, view: str, data: Any) -> None:
        """Store `data` as the latest `view`; readers wake only if it changed."""
        encoded = msgspec.json.encode(data)
        previous = self._views.get(view)
        if previous is not None and previous[1] == encoded:
            return
        self.version += 1
        self._views[view] = (self.version, encoded)
        self._changed.set()
        self._changed = anyio.Event()

    def get(self, view: str) -> bytes | None:
        """The latest JSON of `view`, or None before it was first sampled."""
        found = self._views.get(view)
        return found[1] if found else None

    def newer(self, seen: dict[str, int]) -> list[tuple[str, int, bytes]]:
        """Views changed since `seen` (view -> version), which is updated."""
        changed = []
        for view, (version, data) in sorted(self._views.items(), key=lambda kv: kv[1][0]):
            if seen.get(view, 0) < version:
                seen[view] = version
                changed.append((view, version, data))
        return changed

    def changed(self) -> anyio.Event:
        """Set at the next change: take it *before* reading with `newer`, then wait on it."""
        return self._changed


class Sampler:
    """Samples services, streams, dead letters and traces every `interval` seconds.

    `extra` views (name -> a function building it) are put in the hub at each sample too.
    """

    def __init__(
        self,
        client: Client,
        hub: Hub,
        *,
        interval: float = 1.0,
        history_seconds: float = 300.0,
        trace_file: Path | None = None,
        url: str = "",
        extra: dict[str, Callable[[], Any]] | None = None,
    ) -> None:
        self.client = client
        self.hub = hub
        self.interval = interval
        self.trace_file = trace_file
        self.url = url
        self.extra = dict(extra or {})
        self.views = Views(history_points=max(10, int(history_seconds / interval)))
        self._ticks = 0
        self._wake = anyio.Event()
        self._dead_letter_state: tuple[int, int] | None = None
        self._trace_state: tuple[float, int] | None = None

    def declared_job_kinds(self) -> list[str]:
        """Job kinds the running services declare (`$SRV.INFO` endpoints of kind job)."""
        return sorted(
            {
                (e.metadata or {}).get("job_kind") or f"{info.name}.{e.name}"
                for info in self.views.infos.values()
                for e in info.endpoints
                if (e.metadata or {}).get("kind") == "job"
            }
        )

    def poke(self) -> None:
        """Sample now (after an action), not at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Sample every `interval` (sooner when poked) until cancelled."""
        while True:
            await self.sample()
            with anyio.move_on_after(self.interval):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def sample(self) -> None:
        """One round; a part that fails shows its error in `health` and the rest goes on."""
        errors: dict[str, str] = {}
        parts: dict[str, Callable[[], Awaitable[None]]] = {
            "services": self._services,
            "streams": self._streams,
            "deadletters": self._dead_letters,
            "traces": self._traces,
        }
        for name, part in parts.items():
            try:
                with anyio.fail_after(max(5.0, 2 * self.interval)):
                    await part()
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {error}".strip()
                _log.debug("dashboard sample failed", part=name, error=errors[name])
        for name, build in self.extra.items():  # views kept current elsewhere (jobs)
            try:
                self.hub.put(name, build())
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {error}".strip()
        self._ticks += 1
        self.hub.put("health", self._health(errors))

    def _health(self, errors: dict[str, str]) -> dict[str, Any]:
        nc = self.client.nc
        return {
            "connected": bool(nc.is_connected),
            "server": redact_url(str(nc.connected_url.geturl())) if nc.connected_url else "",
            "url": redact_url(self.url),
            "errors": errors,
            "interval": self.interval,
        }

    async def _services(self) -> None:
        stats = await self.client.stats(timeout=DISCOVERY_TIMEOUT)
        if self._ticks % INFO_EVERY == 0 or self.views.needs_info(stats):
            self.views.add_infos(await self.client.info(timeout=DISCOVERY_TIMEOUT))
        now = time.time()
        self.views.add_stats(stats, now)
        self.hub.put("services", {"services": self.views.services(now, self.interval)})

    async def _streams(self) -> None:
        js = self.client.js
        now = time.time()
        rows, alive = [], set()
        for info in sorted(await js.streams_info(), key=lambda i: i.config.name):
            name = info.config.name
            consumers = []
            for consumer in sorted(await js.consumers_info(name), key=lambda c: c.name):
                alive.add((name, consumer.name))
                history = self.views.record_lag(name, consumer.name, consumer.num_pending or 0, now)
                consumers.append(consumer_row(consumer, history))
            rows.append(
                {
                    "name": name,
                    "kind": stream_kind(name),
                    "subjects": list(info.config.subjects or []),
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "first_seq": info.state.first_seq,
                    "last_seq": info.state.last_seq,
                    "consumers": consumers,
                }
            )
        self.views.forget_lag(alive)
        self.hub.put("streams", {"streams": rows, "interval": self.interval})

    async def _dead_letters(self) -> None:
        """Relisted only when the stream changed (a list is a request per dead letter)."""
        try:
            info = await self.client.js.stream_info(DEADLETTER_STREAM)
            state = (info.state.messages, info.state.last_seq)
        except NotFoundError:
            state = (0, 0)
        if state == self._dead_letter_state:
            return
        letters = await list_dead_letters(self.client, limit=DEAD_LETTER_ROWS) if state[0] else []
        rows = [
            {
                "id": d.id,
                "service": d.service,
                "handler": d.handler,
                "reason": d.reason,
                "error": d.error[:300],
                "attempts": d.attempts,
                "event_type": d.event_type,
                "event_id": d.event_id,
                "subject": d.subject,
                "time": d.time,
            }
            for d in letters
        ]
        self.hub.put("deadletters", {"total": state[0], "rows": rows})
        self._dead_letter_state = state

    async def _traces(self) -> None:
        path = self.trace_file
        if path is None:
            self.hub.put("traces", {"file": None, "traces": []})
            return
        try:
            stat = path.stat()
            state: tuple[float, int] | None = (stat.st_mtime, stat.st_size)
        except OSError:
            state = None
        if state == self._trace_state and state is not None:
            return
        self._trace_state = state
        traces = await anyio.to_thread.run_sync(recent_traces, path) if state else []
        self.hub.put("traces", {"file": str(path), "traces": traces})
