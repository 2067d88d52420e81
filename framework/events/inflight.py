"""Which event ids this process is handling, settling or has just marked handled.

The idempotency bucket answers "was this event handled?" for every replica, but its
answer is a round trip old: a redelivery that arrives while this process still runs or
settles the event (a pause past `ack_wait` of this process or of the server, then the
redelivery comes to the same process) finds no marker and would run the handler a
second time. This table closes that window inside the process: an id is claimed right
before its handler runs and released when its outcome is settled, and the last ids
marked are remembered so a lookup made just before their markers were stored is not
trusted. It is bounded: claims by the subscriber's admission (`max_unsettled`), the
remembered marks by `remember`. What it cannot see is another process: two replicas run
one event twice only when one of them held it past `ack_wait` (a pause, a partition)
and the other took it over, or when one event was published twice under one id outside
the stream's duplicate window while both copies were in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum

__all__ = ["REMEMBER", "Claim", "InFlight"]

REMEMBER = 1024  # marked ids kept per subscriber (~100 kB)


class Claim(Enum):
    """What claiming an event id for a delivery found."""

    CLAIMED = "claimed"  # nobody here has it: run the handler
    BUSY = "busy"  # a delivery of this id is being handled or settled here
    MARKED = "marked"  # this process marked it handled a moment ago (or the bucket has it)
    EXPIRED = "expired"  # this delivery was held here past ack_wait: the server took it back


class InFlight:
    """Event ids claimed (handler running or marker being stored) and recently marked.

    `marks` counts the ids ever marked here; a lookup stamped with `marks` earlier is
    complete together with this table only while fewer than `remember` marks happened
    since (`covers`), else the caller looks the id up again.
    """

    def __init__(self, remember: int = REMEMBER) -> None:
        self._claimed: dict[str, int] = {}  # event id -> stream sequence of its delivery
        self._marked: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self.marks = 0

    def __len__(self) -> int:
        return len(self._claimed)

    def covers(self, marks_at_lookup: int) -> bool:
        """Whether every id marked here since a lookup stamped `marks_at_lookup` is known."""
        return self.marks - marks_at_lookup <= self._remember

    def holder(self, event_id: str) -> int | None:
        """The stream sequence of the delivery that claimed `event_id`, if one did."""
        return self._claimed.get(event_id)

    def claim(self, event_id: str, sequence: int) -> Claim:
        """Claim `event_id` for the delivery at stream `sequence`, unless it is taken."""
        if event_id in self._claimed:
            return Claim.BUSY
        if event_id in self._marked:
            return Claim.MARKED
        self._claimed[event_id] = sequence
        return Claim.CLAIMED

    def release(self, event_id: str, *, marked: bool) -> None:
        """The claim's outcome is settled: its marker stored (`marked`) or not."""
        self._claimed.pop(event_id, None)
        if marked:
            self.marks += 1
            self._marked[event_id] = None
            if len(self._marked) > self._remember:
                self._marked.popitem(last=False)
