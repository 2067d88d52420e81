"""What the dashboard shows, computed from what a `mesh` CLI user can read.

Services come from `$SRV.INFO` and `$SRV.STATS` (rates are differences between
samples), streams and consumers from the JetStream API, dead letters from the
`DEADLETTER` stream. Each view is plain JSON-ready data; `Views` keeps the little
history the figures need (counts a few seconds ago, lag over the last minutes).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...rpc.discovery import EndpointStats, InfoResponse, StatsResponse

__all__ = ["RATE_WINDOW", "Views", "consumer_row", "stream_kind"]

RATE_WINDOW = 10.0  # seconds of counts a rate is computed over
FORGET_DOWN_AFTER = 600.0  # an instance gone this long is no longer listed
SPARK_POINTS = 60  # lag samples sent per consumer (the history itself is kept whole)


@dataclass
class _Instance:
    name: str
    id: str
    version: str
    started: str
    last_seen: float
    stats: StatsResponse


@dataclass
class _Counts:
    """(time, requests, errors) samples of one endpoint of one instance."""

    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, when: float, requests: int, errors: int) -> None:
        """One sample; samples older than the rate window (but two) are dropped."""
        self.samples.append((when, requests, errors))
        while len(self.samples) > 2 and when - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()

    def rates(self) -> tuple[float, float]:
        """Requests and errors per second over the window (0 after a counter reset)."""
        if len(self.samples) < 2:
            return 0.0, 0.0
        (t0, r0, e0), (t1, r1, e1) = self.samples[0], self.samples[-1]
        span = t1 - t0
        if span <= 0 or r1 < r0:
            return 0.0, 0.0
        return (r1 - r0) / span, max(0, e1 - e0) / span


def _kind(info: InfoResponse | None, endpoint: str) -> dict[str, str]:
    if info is None:
        return {}
    for e in info.endpoints:
        if e.name == endpoint:
            return dict(e.metadata or {})
    return {}


def stream_kind(name: str) -> str:
    """What a stream holds, by the naming conventions of JetStream and of the framework."""
    if name.startswith("KV_"):
        return "key-value"
    if name.startswith("OBJ_"):
        return "objects"
    if name == "DEADLETTER":
        return "dead letters"
    if name.startswith("EVENTS_"):
        return "events"
    return "stream"


def consumer_row(info: Any, history: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """One consumer: lag (pending), ack pending, redeliveries, lag over time."""
    return {
        "name": info.name,
        "pending": info.num_pending or 0,
        "ack_pending": info.num_ack_pending or 0,
        "redelivered": info.num_redelivered or 0,
        "waiting": info.num_waiting or 0,
        "delivered": getattr(info.delivered, "stream_seq", 0) or 0,
        "filter": getattr(info.config, "filter_subject", None) or "",
        "lag_history": [[round(t, 1), n] for t, n in _thin(history, SPARK_POINTS)],
    }


def _thin(points: Sequence[tuple[float, int]], most: int) -> Sequence[tuple[float, int]]:
    """At most `most` points, evenly spread, the latest always kept (a sparkline's worth)."""
    if len(points) <= most:
        return points
    step = len(points) / most
    return [points[min(len(points) - 1, round((i + 1) * step) - 1)] for i in range(most)]


class Views:
    """The state between samples: instances seen, their counts, consumer lag history."""

    def __init__(self, *, history_points: int = 300) -> None:
        self.history_points = history_points
        self.instances: dict[tuple[str, str], _Instance] = {}
        self.infos: dict[tuple[str, str], InfoResponse] = {}
        self.counts: dict[tuple[str, str, str], _Counts] = {}
        self.lag: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def needs_info(self, stats: Iterable[StatsResponse]) -> bool:
        """An instance whose endpoints we do not know yet."""
        return any((s.name, s.id) not in self.infos for s in stats)

    def add_infos(self, infos: Iterable[InfoResponse]) -> None:
        """Remember each instance's endpoints (kinds, event types, schemas)."""
        for info in infos:
            self.infos[(info.name, info.id)] = info

    def add_stats(self, stats: Iterable[StatsResponse], now: float | None = None) -> None:
        """Record a sample; instances gone for `FORGET_DOWN_AFTER` are dropped."""
        now = time.time() if now is None else now
        for s in stats:
            self.instances[(s.name, s.id)] = _Instance(s.name, s.id, s.version, s.started, now, s)
            for e in s.endpoints:
                key = (s.name, s.id, e.name)
                self.counts.setdefault(key, _Counts()).add(now, e.num_requests, e.num_errors)
        for gone, instance in list(self.instances.items()):
            if now - instance.last_seen > FORGET_DOWN_AFTER:
                del self.instances[gone]
                self.infos.pop(gone, None)
                for count_key in [k for k in self.counts if k[:2] == gone]:
                    del self.counts[count_key]

    def services(self, sampled_at: float, interval: float) -> list[dict[str, Any]]:
        """Every service with its instances (up or down), endpoints and totals."""
        by_name: dict[str, list[_Instance]] = {}
        for instance in self.instances.values():
            by_name.setdefault(instance.name, []).append(instance)
        return [
            self._service(name, instances, sampled_at, interval)
            for name, instances in sorted(by_name.items())
        ]

    def _service(
        self, name: str, instances: list[_Instance], sampled_at: float, interval: float
    ) -> dict[str, Any]:
        # an instance that missed the latest sample (with some slack) is down
        cutoff = sampled_at - max(2.5 * interval, 1.0)
        rows = [
            {
                "id": i.id,
                "version": i.version,
                "started": i.started,
                "up": i.last_seen >= cutoff,
                "last_seen": round(i.last_seen, 1),
            }
            for i in sorted(instances, key=lambda i: i.id)
        ]
        live = [i for i in instances if i.last_seen >= cutoff]
        endpoints = self._endpoints(name, live or instances)
        info = next((self.infos.get((name, i.id)) for i in instances), None)
        return {
            "name": name,
            "version": max((i.version for i in instances), default=""),
            "description": info.description if info is not None else "",
            "instances": rows,
            "up": len(live),
            "down": len(instances) - len(live),
            "endpoints": endpoints,
            **_totals(endpoints),
        }

    def _endpoints(self, service: str, instances: list[_Instance]) -> list[dict[str, Any]]:
        merged: dict[str, list[tuple[_Instance, EndpointStats]]] = {}
        for instance in instances:
            for e in instance.stats.endpoints:
                merged.setdefault(e.name, []).append((instance, e))
        return [self._endpoint(service, name, rows) for name, rows in sorted(merged.items())]

    def _endpoint(
        self, service: str, name: str, rows: list[tuple[_Instance, EndpointStats]]
    ) -> dict[str, Any]:
        requests = sum(e.num_requests for _, e in rows)
        errors = sum(e.num_errors for _, e in rows)
        busy = sum(e.processing_time for _, e in rows)
        rates = [self.counts[(service, i.id, name)].rates() for i, _ in rows]
        meta = _kind(self.infos.get((service, rows[0][0].id)), name)
        data = [e.data or {} for _, e in rows]
        last_error = next((e.last_error for _, e in rows if e.last_error), "")
        return {
            "name": name,
            "subject": rows[0][1].subject,
            "kind": meta.get("kind", "rpc"),
            "event_type": meta.get("event_type", ""),
            "stream": meta.get("stream", ""),
            "consumer": meta.get("consumer", ""),
            "requests": requests,
            "errors": errors,
            "avg_ms": round(busy / requests / 1e6, 3) if requests else 0.0,
            "rate": round(sum(r for r, _ in rates), 2),
            "error_rate": round(sum(e for _, e in rates), 2),
            "pending": max((d.get("pending", 0) for d in data), default=0),
            "redelivered": sum(d.get("redelivered", 0) for d in data),
            "dead_lettered": sum(d.get("dead_lettered", 0) for d in data),
            "in_flight": sum(d.get("in_flight", 0) for d in data),
            "last_error": last_error,
        }

    def record_lag(self, stream: str, consumer: str, pending: int, now: float) -> list[Any]:
        """Add a lag sample of one consumer; its history (bounded) so far."""
        history = self.lag.setdefault((stream, consumer), deque(maxlen=self.history_points))
        history.append((now, pending))
        return list(history)

    def forget_lag(self, alive: set[tuple[str, str]]) -> None:
        """Drop the history of consumers that no longer exist."""
        for key in [k for k in self.lag if k not in alive]:
            del self.lag[key]


def _totals(endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(e["requests"] for e in endpoints)
    busy = sum(e["avg_ms"] * e["requests"] for e in endpoints)
    return {
        "requests": requests,
        "errors": sum(e["errors"] for e in endpoints),
        "rate": round(sum(e["rate"] for e in endpoints), 2),
        "error_rate": round(sum(e["error_rate"] for e in endpoints), 2),
        "avg_ms": round(busy / requests, 3) if requests else 0.0,
    }
