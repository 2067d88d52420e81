"""Typed errors that cross the wire as NATS service API (ADR-32) error headers.

A handler raises a `ServiceError`; the caller gets the same class back, so error
handling reads the same on both sides of a request.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BadRequest",
    "ConfigConflict",
    "DeadlineExceeded",
    "InvalidName",
    "NoResponders",
    "NoStream",
    "NotFound",
    "PermissionDenied",
    "PublishError",
    "Reject",
    "RemoteError",
    "ServiceError",
    "StreamUnavailable",
    "error_from_code",
]


class ServiceError(Exception):
    """An error a handler answers with; `code` follows HTTP conventions as ADR-32 does."""

    default_code: ClassVar[int] = 500

    def __init__(self, code: int, message: str, *, service: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.service = service

    def __str__(self) -> str:
        where = f" from {self.service}" if self.service else ""
        return f"{self.code}{where}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.message!r}, service={self.service!r})"


class _FixedCode(ServiceError):
    """A `ServiceError` whose code is implied by its class."""

    def __init__(self, message: str, *, service: str | None = None) -> None:
        super().__init__(self.default_code, message, service=service)


class BadRequest(_FixedCode):
    """The payload or a header could not be decoded or failed validation."""

    default_code = 400


class NotFound(_FixedCode):
    """The thing asked for does not exist (also: an unknown endpoint)."""

    default_code = 404


class DeadlineExceeded(_FixedCode):
    """The caller's deadline passed before an answer was ready."""

    default_code = 408


class RemoteError(_FixedCode):
    """The handler failed unexpectedly; the message carries an error id, never a traceback."""

    default_code = 500


class NoResponders(_FixedCode):
    """Nobody serves the subject, reported at once by the server instead of a timeout."""

    default_code = 503


_BY_CODE: dict[int, type[_FixedCode]] = {
    cls.default_code: cls
    for cls in (BadRequest, NotFound, DeadlineExceeded, RemoteError, NoResponders)
}


def error_from_code(code: int, message: str, *, service: str | None = None) -> ServiceError:
    """Rebuild the most specific error class for a code received over the wire."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ServiceError(code, message, service=service)
    return cls(message, service=service)


class Reject(Exception):
    """Raised by an event handler: the event can never succeed, dead-letter it now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidName(ValueError):
    """A service, endpoint, event type or subject token is not allowed on the wire."""


class ConfigConflict(RuntimeError):
    """An existing stream or consumer differs from the declared one; nothing was changed.

    `differences` maps each field to (existing, declared); `hint`, when given, says whose
    the existing one is and how to resolve the conflict.
    """

    def __init__(
        self, what: str, differences: dict[str, tuple[object, object]], *, hint: str = ""
    ) -> None:
        self.what = what
        self.differences = differences
        self.hint = hint
        lines = ", ".join(
            f"{k}: existing={a!r} declared={b!r}" for k, (a, b) in differences.items()
        )
        message = f"{what} exists with a different configuration ({lines})"
        super().__init__(f"{message}. {hint}" if hint else message)


class PublishError(RuntimeError):
    """An event could not be stored (no stream captures it, permission denied, timeout)."""


class PermissionDenied(Exception):
    """The server refused a publish to this subject: the user lacks the permission."""


class NoStream(PublishError):
    """No stream captures the event's subject: nothing was stored."""


class StreamUnavailable(PublishError):
    """The stream exists but could not store the event now: it has no leader reachable
    from this server (an election, a network partition), or JetStream itself cannot be
    reached from it. Retryable: the publish was retried until its timeout; publishing
    again with the same event id is safe (the stream stores it once)."""

    retryable = True
