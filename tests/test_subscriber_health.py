"""The in-flight table and the stall tracker: their rules on their own, and their cost.

The fault tests (`test_faults_jepsen.py`) show what they do under pauses, partitions
and full disks; these pin down their rules.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from framework import Context, Service
from framework.events.health import Health
from framework.events.idempotency import ProcessedIds
from framework.events.inflight import REMEMBER, Claim, InFlight
from framework.testing import eventually


class Created(msgspec.Struct):
    order_id: str


def test_an_id_is_claimed_once_until_its_outcome_is_settled() -> None:
    table = InFlight()
    assert table.claim("e-1", 7) is Claim.CLAIMED
    assert table.claim("e-1", 7) is Claim.BUSY  # a redelivery of the same message
    assert table.claim("e-1", 9) is Claim.BUSY  # another message with the same id
    assert table.holder("e-1") == 7 and len(table) == 1
    table.release("e-1", marked=False)  # failed: the next delivery runs it
    assert table.holder("e-1") is None and len(table) == 0
    assert table.claim("e-1", 7) is Claim.CLAIMED


def test_a_marked_id_is_remembered_not_claimed_again() -> None:
    table = InFlight()
    table.claim("e-1", 1)
    table.release("e-1", marked=True)
    assert table.claim("e-1", 1) is Claim.MARKED
    assert table.marks == 1 and len(table) == 0


def test_the_remembered_marks_are_bounded_and_say_when_a_lookup_is_too_old() -> None:
    table = InFlight(remember=3)
    stamp = table.marks
    for n in range(3):
        table.claim(f"e-{n}", n)
        table.release(f"e-{n}", marked=True)
    assert table.covers(stamp)  # every mark since the lookup is still known
    table.claim("e-3", 3)
    table.release("e-3", marked=True)
    assert not table.covers(stamp)  # e-0 was forgotten: look it up again
    assert table.claim("e-0", 0) is Claim.CLAIMED  # (the bucket, not the table, says)
    assert table.claim("e-3", 3) is Claim.MARKED


def test_a_short_failure_is_quiet_and_a_long_one_a_stall_until_every_part_works() -> None:
    health = Health("svc_sub", stall_after=0.2)
    health.failed("markers", "insufficient resources")
    assert not health.stalled and health.stats()["stalled_since"] is None
    health.ok("markers")  # a blip: no stall, nothing to report
    assert health.stats() == {"stalled_since": None, "stall_reason": None, "stalls": 0}

    health.failed("markers", "insufficient resources", since=time.monotonic() - 1.0)
    assert health.stalled  # the attempt began a second ago: a stall at once
    stats = health.stats()
    assert stats["stall_reason"] == "markers: insufficient resources"
    assert stats["stalled_since"] is not None and stats["stalls"] == 1
    health.failed("pulls", "no heartbeat")
    health.ok("markers")
    assert health.stalled  # pulls still fail
    health.ok("pulls")
    assert not health.stalled and health.stats()["stalled_since"] is None
    assert health.stats()["stalls"] == 1


def test_a_stall_is_noticed_by_the_periodic_check_while_an_attempt_still_waits() -> None:
    health = Health("svc_sub", stall_after=0.05)
    health.failed("pulls", "no message or heartbeat", since=time.monotonic())
    assert not health.stalled
    time.sleep(0.06)
    health.check()
    assert health.stalled and health.stats()["stall_reason"].startswith("pulls:")


async def test_screened_lookups_are_trusted_not_asked_again_per_event(
    serve: Any, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-flight table adds no round trip: an event looked up with its pull runs on
    that answer (more events than the table remembers, so its stamps must advance)."""
    asked: list[str] = []
    seen = ProcessedIds.seen

    async def counting(self: ProcessedIds, event_id: str) -> bool:
        asked.append(event_id)
        return await seen(self, event_id)

    monkeypatch.setattr(ProcessedIds, "seen", counting)
    total = 3 * REMEMBER
    handled: list[str] = []
    svc = Service("tally")

    @svc.subscribe("order.created.v1", max_concurrency=32)
    async def on_created(event: Created, ctx: Context) -> None:
        handled.append(ctx.event_id or "")

    await serve(svc)
    async with client.batch() as batch:
        for i in range(total):
            await batch.publish("order.created.v1", Created(f"o-{i}"), event_id=f"e-{i}")
    await eventually(lambda: len(handled) >= total, 30, "every event handled")
    assert len(handled) == total
    assert asked == []
