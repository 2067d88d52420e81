"""A subscriber's options: their defaults and bounds, checked once, in one place.

`Service.subscribe` takes these as keywords (and documents each); the subscriber and
its parts read the frozen result, so no default is spelled out twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .idempotency import DEFAULT_TTL

__all__ = ["DEFAULT_BACKOFF", "SUBSCRIBE_DEFAULTS", "UNSETTLED_PER_HANDLER", "SubscribeOptions"]

DEFAULT_BACKOFF = (1.0, 5.0, 15.0, 60.0)
UNSETTLED_PER_HANDLER = 8  # the default `max_unsettled`, per `max_concurrency`


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeOptions:
    """How a subscriber retries, paces and remembers events (see `Service.subscribe`).

    Raises `ValueError` on construction for a value out of bounds, so a bad option
    fails where the handler is declared, not on the first event.
    """

    max_deliver: int = 5
    """Attempts before the event is dead-lettered (>= 1)."""
    backoff: Sequence[float] = DEFAULT_BACKOFF
    """Seconds before attempt i + 2 (each >= 0; the last repeats; empty: no delay)."""
    ack_wait: float = 30.0
    """Seconds an unacknowledged delivery waits before redelivery (> 0)."""
    max_concurrency: int = 16
    """Handlers running at once in one replica (>= 1)."""
    max_processing_time: float | None = 300.0
    """Seconds before a running handler is cancelled (> 0; None: no limit)."""
    deliver: Literal["all", "new"] = "all"
    """Where a new consumer starts: the stream's oldest event, or the next one."""
    idempotent: bool = True
    """Skip events whose id this subscriber has already handled."""
    idempotency_ttl: float = DEFAULT_TTL
    """Seconds a handled event id is remembered (> 0)."""
    dead_letter: bool = True
    """Copy an event that is given up on to the dead-letter stream before terminating it."""
    ordered_by: Callable[[Any], Hashable] | None = None
    """Key of an event: events with equal keys are handled one at a time, in order."""
    max_ack_pending: int | None = None
    """Deliveries unacknowledged at once, all replicas together (>= 1; None: see
    `ack_pending_limit`)."""
    max_unsettled: int | None = None
    """Events of an idempotent subscriber between hand-over to the handlers and
    settlement (marker stored, then acked) at once in one replica: the most a crash
    can run twice (>= max_concurrency; None: see `unsettled_limit`)."""

    def __post_init__(self) -> None:
        # a list is accepted for `backoff` (the README shows one); kept as a tuple, so
        # the options stay immutable and hashable
        backoff = tuple(float(delay) for delay in self.backoff) or (0.0,)
        object.__setattr__(self, "backoff", backoff)
        if self.max_deliver < 1 or self.max_concurrency < 1:
            raise ValueError("max_deliver and max_concurrency must be at least 1")
        if self.deliver not in ("all", "new"):
            raise ValueError("deliver must be 'all' or 'new'")
        if any(not delay >= 0 or math.isinf(delay) for delay in backoff):
            raise ValueError(f"backoff delays must be finite and not negative, not {backoff}")
        _positive("ack_wait", self.ack_wait)
        _positive("idempotency_ttl", self.idempotency_ttl)
        if self.max_processing_time is not None:
            _positive("max_processing_time", self.max_processing_time)
        if self.max_ack_pending is not None and self.max_ack_pending < 1:
            raise ValueError("max_ack_pending must be at least 1 (or None)")
        if self.max_unsettled is not None and self.max_unsettled < self.max_concurrency:
            raise ValueError(
                f"max_unsettled ({self.max_unsettled}) must be at least max_concurrency "
                f"({self.max_concurrency}), or None for {UNSETTLED_PER_HANDLER} * max_concurrency"
            )

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> SubscribeOptions:
        """The options among `arguments` (a decorator's `locals()`), the rest ignored."""
        return cls(
            **{f.name: arguments[f.name] for f in dataclasses.fields(cls) if f.name in arguments}
        )

    @property
    def ack_pending_limit(self) -> int:
        """`max_ack_pending`, or by default max(1000, 4 * max_concurrency)."""
        return self.max_ack_pending or max(1000, 4 * self.max_concurrency)

    @property
    def unsettled_limit(self) -> int:
        """`max_unsettled`, or by default `UNSETTLED_PER_HANDLER * max_concurrency`.

        Wider than `max_concurrency` so that markers are stored in batches big enough
        for the server (its cost is mostly per batch) while the handlers work on.
        """
        return self.max_unsettled or UNSETTLED_PER_HANDLER * self.max_concurrency

    def retry_delay(self, attempt: int) -> float:
        """Seconds before the attempt after `attempt` (1-based): the last delay repeats."""
        return self.backoff[min(attempt - 1, len(self.backoff) - 1)]


def _positive(name: str, value: float) -> None:
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be more than 0 seconds, not {value}")


SUBSCRIBE_DEFAULTS = SubscribeOptions()
"""Every option at its default: what `Service.subscribe`'s keywords default to."""
