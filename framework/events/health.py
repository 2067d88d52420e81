"""Loud when stuck: a subscriber whose pulls, lookups or settlements keep failing says so.

A failure that lasts a moment (a reconnect, a leader election) is retried quietly; one
that lasts `STALL_AFTER` seconds makes the subscriber *stalled*: one warning with the
part that fails and the server's own words, `stalled_since` and `stall_reason` in its
`$SRV.STATS` entry, and one more in the `mesh.subscriber.stalls` metric. When every part
works again it logs how long the stall lasted and clears the fields; nothing needs a
restart. Parts report `failed` (with when the failing attempt began) and `ok`; `check`
runs from the pull loop, about once a second, so a stall is noticed even while its
attempt is still waiting for a timeout.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ..observability.logging import get_logger

__all__ = ["STALL_AFTER", "Health"]

_log = get_logger("framework.events.subscriber")

STALL_AFTER = 3.0  # seconds of failure before a subscriber counts as stalled


class Health:
    """Since when, and why, parts of one subscriber (pulls, lookups, markers) fail."""

    def __init__(self, consumer: str, stall_after: float = STALL_AFTER) -> None:
        self._consumer = consumer
        self._stall_after = stall_after
        self._failing: dict[str, tuple[float, str]] = {}  # part -> (since, cause)
        self._stalled_at: float | None = None  # monotonic, when the warning went out
        self._stalled_since: float | None = None  # wall clock, when the failure began
        self._reason = ""
        self.stalls = 0  # stall episodes since start

    @property
    def stalled(self) -> bool:
        """Whether a stall was reported and has not ended."""
        return self._stalled_at is not None

    def failed(self, part: str, cause: str, since: float | None = None) -> None:
        """`part` failed with `cause`; `since` (monotonic) is when its attempt began."""
        now = time.monotonic()
        began = self._failing.get(part, (min(since or now, now), ""))[0]
        self._failing[part] = (began, cause)
        self.check(now)

    def ok(self, part: str) -> None:
        """`part` works (again); the stall ends when no part fails any more."""
        if self._failing.pop(part, None) is None or self._failing:
            return
        if self._stalled_at is not None:
            lasted = time.monotonic() - self._stalled_at + self._stall_after
            # at the stall's level, so whoever saw it start sees it end
            _log.warning(
                "subscriber resumed", consumer=self._consumer, stalled_for_s=round(lasted, 1)
            )
            self._stalled_at = self._stalled_since = None
            self._reason = ""

    def check(self, now: float | None = None) -> None:
        """Report a stall once a part has failed for `stall_after` seconds."""
        if not self._failing or self._stalled_at is not None:
            return
        now = time.monotonic() if now is None else now
        part, (began, cause) = min(self._failing.items(), key=lambda item: item[1][0])
        if now - began < self._stall_after or not cause:
            return
        self._stalled_at = now
        self._stalled_since = time.time() - (now - began)
        self._reason = f"{part}: {cause}"
        self.stalls += 1
        _log.warning(
            "subscriber stalled",
            consumer=self._consumer,
            part=part,
            error=cause,
            failing_for_s=round(now - began, 1),
        )

    def stats(self) -> dict[str, Any]:
        """`stalled_since` (ISO 8601, UTC) and `stall_reason`, None when healthy; `stalls`."""
        since = self._stalled_since
        return {
            "stalled_since": None
            if since is None
            else datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds"),
            "stall_reason": self._reason or None,
            "stalls": self.stalls,
        }
