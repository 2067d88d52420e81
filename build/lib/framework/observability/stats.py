"""Per-handler counters behind `$SRV.STATS` (ADR-32 units: nanoseconds)."""

from __future__ import annotations

__all__ = ["HandlerStats"]


class HandlerStats:
    __slots__ = (
        "dead_lettered",
        "in_flight",
        "last_error",
        "num_errors",
        "num_requests",
        "processing_time",
        "redelivered",
    )

    def __init__(self) -> None:
        self.num_requests = 0
        self.num_errors = 0
        self.last_error = ""
        self.processing_time = 0
        self.in_flight = 0
        self.redelivered = 0
        self.dead_lettered = 0

    def record(self, elapsed_ns: int, error: str | None = None) -> None:
        self.num_requests += 1
        self.processing_time += elapsed_ns
        if error is not None:
            self.num_errors += 1
            self.last_error = error

    @property
    def average_processing_time(self) -> int:
        return self.processing_time // self.num_requests if self.num_requests else 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]
