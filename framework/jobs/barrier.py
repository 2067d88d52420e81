"""A read barrier on a connection: wait until everything the server sent before now is read.

A worker holding a job it has not started learns of a cancel from the core NATS cancel
notice alone, and `cancel()` returns once the canceller's server has routed that notice
to the worker's connection, not once the worker has read it. Before such a job starts,
the worker sends a PING and waits for its PONG: the server writes the PONG after
whatever it had queued for the connection before the PING came (one connection's
messages are delivered in order), so a notice routed before then has been read by the
time the PONG is, and handled too, as cancel notices are handled in the read loop
itself (`wire.subscribe_inline`).

A connection lost and made again meanwhile may have lost a notice with it: a wait
taken on an earlier connection (`mark`) fails, and the job's record decides.

One PING serves many jobs, and one is in flight at a time (a group commit): the first
waiter opens a round, which the others join until its PING is sent; that happens once
the event loop has run once (the others of that moment join), or, while an earlier
PING is in flight, once its PONG is back. Anyone arriving after a PING has left waits
for the next one (an earlier PING may have reached the server before the cancel did).
Under load that is one PING per round trip, however many held jobs start.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel

__all__ = ["ReadBarrier"]

TIMEOUT = 5  # seconds a PONG may take (whole: nats-py's flush); then the barrier fails


class _Round:
    __slots__ = ("done", "read")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.read = False


class ReadBarrier:
    """Coalesced PING/PONG round trips on one nats-py connection (see the module)."""

    def __init__(self, nc: Any, timeout: int = TIMEOUT) -> None:
        self._nc = nc
        self._timeout = timeout
        self._open: _Round | None = None  # the round whose PING has not been sent yet
        self._flying: _Round | None = None  # the round whose PONG is awaited
        self.rounds = 0  # PINGs sent, for tests and stats

    def mark(self) -> int:
        """The connection's reconnect count: taken when a job starts to wait, and given
        to `wait`, which fails if the connection was lost since (what the server sent
        while it was down, a cancel notice among it, is lost with it)."""
        return int(self._nc.stats.get("reconnects", 0))

    async def wait(self, since: int) -> bool:
        """True once everything the server routed to this connection before the call
        has been read, on the connection of `since` (a `mark`); False if that cannot
        be known (no connection, one reconnected since, no PONG in time): the caller
        then asks the record instead."""
        return await self._round() and self.mark() == since

    async def _round(self) -> bool:
        """Join the round still open (its PING not sent), or open one and send it."""
        joined = self._open
        if joined is not None:
            await joined.done.wait()
            return joined.read
        current = self._open = _Round()
        try:
            if self._flying is not None:  # one PING at a time: this round gathers meanwhile
                await self._flying.done.wait()
            else:
                await anyio.lowlevel.checkpoint()  # the other jobs of this moment join
            self._open, self._flying = None, current  # a newcomer now needs the next PING
            self.rounds += 1
            if self._nc.is_connected:
                await self._nc.flush(self._timeout)  # raises when no PONG comes in time
                current.read = True
        except Exception:
            current.read = False
        finally:
            if self._open is current:
                self._open = None
            if self._flying is current:
                self._flying = None
            current.done.set()
        return current.read
