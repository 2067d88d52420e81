"""Handler metrics through the OpenTelemetry metrics API (no SDK needed in the core).

Instruments, created once per process when this module is imported (proxies that
follow a MeterProvider installed later):

| instrument                      | type                        | unit        |
| ------------------------------- | --------------------------- | ----------- |
| `mesh.handler.handled`          | observable counter          | `{message}` |
| `mesh.handler.failed`           | observable counter          | `{message}` |
| `mesh.handler.duration`         | histogram                   | `s`         |
| `mesh.handler.in_flight`        | observable up-down counter  | `{message}` |
| `mesh.subscriber.dead_lettered` | observable counter          | `{message}` |
| `mesh.subscriber.lag`           | observable gauge            | `{message}` |
| `mesh.subscriber.stalls`        | observable counter          | `{stall}`   |
| `mesh.subscriber.stalled`       | observable gauge (0 or 1)   | `1`         |

Attributes: `service`, `handler` (endpoint or subscriber name), `kind` (`rpc` or
`subscriber`). The counters are read at collection time from the `HandlerStats` that
`$SRV.STATS` reports anyway, so the only per-message cost is one histogram record
(a no-op without an SDK). Handled counts every handled message; failed, those of them
that failed. Lag is the consumer's pending count, updated with each delivery and on
every `$SRV.STATS` request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .stats import HandlerStats

__all__ = ["TimedStats", "stats_for", "track", "untrack"]

# messaging.process.duration's advisory buckets from the messaging conventions (seconds)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


class _Handler(Protocol):
    stats: HandlerStats


_tracked: dict[int, tuple[dict[str, str], _Handler]] = {}


def _attributes(service: str, handler: str, kind: str) -> dict[str, str]:
    return {"service": service, "handler": handler, "kind": kind}


def track(handler: Any) -> None:
    """Report a started handler (RpcEndpoint or Subscriber) at each collection."""
    _tracked[id(handler)] = (_attributes(handler.service, handler.name, handler.kind), handler)


def untrack(handler: Any) -> None:
    _tracked.pop(id(handler), None)


def _handlers() -> list[tuple[dict[str, str], _Handler]]:
    return list(_tracked.values())  # collection may run in an exporter's thread


def _observe(
    read: Callable[[Any], int], subscribers_only: bool = False
) -> Callable[[CallbackOptions], Iterable[Observation]]:
    """A callback reporting `read(handler)` for every tracked handler at collection."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(read(handler), attributes)
            for attributes, handler in _handlers()
            if not subscribers_only or attributes["kind"] == "subscriber"
        ]

    return observe


_observe_handled = _observe(lambda h: h.stats.num_requests)
_observe_failed = _observe(lambda h: h.stats.num_errors)
_observe_in_flight = _observe(lambda h: h.stats.in_flight)
_observe_dead_lettered = _observe(lambda h: h.stats.dead_lettered, subscribers_only=True)
_observe_lag = _observe(lambda h: getattr(h, "pending", 0), subscribers_only=True)
_observe_stalls = _observe(lambda h: h.health.stalls, subscribers_only=True)
_observe_stalled = _observe(lambda h: int(h.health.stalled), subscribers_only=True)


_meter = metrics.get_meter("framework")
handled = _meter.create_observable_counter(
    "mesh.handler.handled",
    [_observe_handled],
    unit="{message}",
    description="Messages handled (requests answered, events processed), failed or not",
)
failed = _meter.create_observable_counter(
    "mesh.handler.failed",
    [_observe_failed],
    unit="{message}",
    description="Messages whose handling failed (error reply, retry or dead letter)",
)
duration = _meter.create_histogram(
    "mesh.handler.duration",
    unit="s",
    description="Time from receiving a message to its outcome",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
)
in_flight = _meter.create_observable_up_down_counter(
    "mesh.handler.in_flight",
    [_observe_in_flight],
    unit="{message}",
    description="Messages being handled now",
)
dead_lettered = _meter.create_observable_counter(
    "mesh.subscriber.dead_lettered",
    [_observe_dead_lettered],
    unit="{message}",
    description="Events copied to the dead-letter stream",
)
lag = _meter.create_observable_gauge(
    "mesh.subscriber.lag",
    [_observe_lag],
    unit="{message}",
    description="Events in the stream this subscriber's consumer has not been delivered yet",
)


stalls = _meter.create_observable_counter(
    "mesh.subscriber.stalls",
    [_observe_stalls],
    unit="{stall}",
    description="Times a subscriber's pulls, lookups or markers failed for seconds on end",
)
stalled = _meter.create_observable_gauge(
    "mesh.subscriber.stalled",
    [_observe_stalled],
    unit="1",
    description="1 while a subscriber is stalled (see stalled_since in $SRV.STATS), else 0",
)


class TimedStats(HandlerStats):
    """`HandlerStats` that also records each duration in the `mesh.handler.duration` histogram."""

    __slots__ = ("_attributes",)

    def __init__(self, service: str = "", handler: str = "", kind: str = "") -> None:
        super().__init__()
        self._attributes = _attributes(service, handler, kind)

    def record(self, elapsed_ns: int, error: str | None = None) -> None:
        HandlerStats.record(self, elapsed_ns, error)
        duration.record(elapsed_ns / 1e9, self._attributes)

    def reset(self) -> None:
        attributes = self._attributes
        HandlerStats.reset(self)
        self._attributes = attributes


def stats_for(service: str, handler: str, kind: str) -> HandlerStats:
    """Stats for `$SRV.STATS` that also feed the duration histogram."""
    return TimedStats(service, handler, kind)
