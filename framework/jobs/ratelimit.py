"""A kind's `rate_limit` across all its replicas, kept by JetStream counters (ADR-49).

Time is cut into windows of `RateLimit.window` seconds (wall clock, so replicas agree
without talking); a start takes a slot by incrementing the window's counter,
`jobs-rate.<service>.<name>.<window number>`, and may go if the value the server
answers is within the window's `allowance`. The server increments atomically, so no
window ever admits more than `allowance` starts, whatever the number of replicas.
Precision: replicas' clocks differ by their skew, which shifts their windows by as
much; over any period T at most (T / window + 1) x allowance jobs start. A replica
lets one of its tasks ask at a time, so a crowd of waiting jobs costs one increment
per replica and window, not one per job.
"""

from __future__ import annotations

import random
import time

import anyio
import msgspec

from ..observability.logging import get_logger
from ..transport.mux import Mux
from .options import RATE_PREFIX, Kind, RateLimit

__all__ = ["RateLimiter"]

_log = get_logger("framework.jobs")

REQUEST_TIMEOUT = 5.0
RETRY_AFTER_ERROR = 1.0


class _Counter(msgspec.Struct):
    val: str = "0"
    error: dict[str, object] | None = None


_decode = msgspec.json.Decoder(_Counter).decode


class RateLimiter:
    """Waits for a start slot of one kind's `rate_limit` (see the module)."""

    def __init__(self, mux: Mux, kind: Kind, limit: RateLimit) -> None:
        self._mux = mux
        self._limit = limit
        self._prefix = f"{RATE_PREFIX}.{kind.service}.{kind.name}."
        self._lock = anyio.Lock()
        self.waited = 0  # starts that had to wait for a later window

    async def acquire(self) -> None:
        """Return once this start fits the limit (waiting for a window with room)."""
        async with self._lock:
            waited = False
            while True:
                now = time.time()
                window = int(now // self._limit.window)
                try:
                    used = await self._increment(window)
                except Exception as exc:  # the limit holds: no start without a slot
                    _log.warning("rate limit counter unavailable", error=str(exc))
                    await anyio.sleep(RETRY_AFTER_ERROR)
                    continue
                if used <= self._limit.allowance:
                    self.waited += waited
                    return
                waited = True
                jitter = random.uniform(0.0, self._limit.window * 0.05)
                await anyio.sleep((window + 1) * self._limit.window - now + jitter)

    async def _increment(self, window: int) -> int:
        reply = await self._mux.request(
            f"{self._prefix}{window}", b"", REQUEST_TIMEOUT, {"Nats-Incr": "+1"}
        )
        counter = _decode(reply.data) if reply.data else None
        if counter is None or counter.error is not None:
            raise RuntimeError(f"counter refused the increment: {reply.data[:200]!r}")
        return int(counter.val)
