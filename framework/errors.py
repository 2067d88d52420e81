"""Every error the framework raises, under one root: catch `MeshError` to catch them all.

A handler raises a `ServiceError`; the caller gets the same class back (ADR-32 error
headers carry the code and message), so error handling reads the same on both sides
of a request. Nothing the public API raises is a nats-py exception: the one place
that turns what the wire says into these classes is `framework.transport.wire_errors`.

    MeshError                      the root
    ├── ServiceError(code, msg)    an answer from a service (ADR-32 code, HTTP-like)
    │   ├── BadRequest        400  undecodable or invalid payload or header
    │   ├── NotFound          404  unknown endpoint, or what was asked for does not exist
    │   ├── DeadlineExceeded  408  the caller's deadline passed
    │   ├── RemoteError       500  the handler failed (the message has an error id only)
    │   └── NoResponders      503  nothing serves the subject
    ├── Reject(reason)             raised by an event handler: dead-letter now, no retry
    ├── InvalidName                a name or subject not allowed on the wire (ValueError)
    ├── InvalidHandler             a handler the framework cannot call (TypeError)
    ├── ConfigConflict             an existing stream/consumer differs (RuntimeError)
    ├── PublishError               an event was not (known to be) stored (RuntimeError)
    │   ├── NoStream               no stream captures the event's subject
    │   ├── StreamUnavailable      it has no reachable leader now (retryable)
    │   └── ConcurrencyConflict    a keyed event's expected last sequence did not match
    ├── PermissionDenied           the server refused a publish to a subject
    ├── JetStreamError             a JetStream API refusal with no more specific class
    │                              (also: a key's history could not be read)
    ├── ConnectionFailed           the first connection failed (ConnectionError)
    │   └── AuthorizationFailed    wrong credentials (ConnectionRefusedError)
    └── ClientClosed               the client was closed; open a new one

The second base classes in brackets are kept so code written against the builtin
classes (`except ValueError`) keeps working.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthorizationFailed",
    "BadRequest",
    "ClientClosed",
    "ConcurrencyConflict",
    "ConfigConflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "InvalidHandler",
    "InvalidName",
    "JetStreamError",
    "MeshError",
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


class MeshError(Exception):
    """The root of every error the framework raises."""


class ServiceError(MeshError):
    """An error a handler answers with; `code` follows HTTP conventions as ADR-32 does.

    Args:
        code: the status sent in `Nats-Service-Error-Code` (400-599 by convention).
        message: the text sent in `Nats-Service-Error`; the caller sees it as is.
        service: the service that answered (set on the caller's side).
    """

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


class Reject(MeshError):
    """Raised by an event handler: the event can never succeed, dead-letter it now.

    Args:
        reason: why; stored with the dead letter and shown by `mesh dlq`.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidName(MeshError, ValueError):
    """A service, endpoint, event type or subject token is not allowed on the wire, or a
    handler name is already taken in its service."""


class InvalidHandler(MeshError, TypeError):
    """A decorated function cannot be a handler (not async, unannotated, extra parameters)."""


class ConfigConflict(MeshError, RuntimeError):
    """An existing stream or consumer differs from the declared one; nothing was changed.

    Args:
        what: the thing that exists, e.g. `stream EVENTS_ORDER`.
        differences: per setting, (existing value, declared value).
        hint: whose the existing one is and how to resolve the conflict, when known.
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


class PublishError(MeshError, RuntimeError):
    """An event could not be stored (no stream captures it, permission denied, timeout)."""


class NoStream(PublishError):
    """No stream captures the event's subject: nothing was stored."""


class StreamUnavailable(PublishError):
    """The stream exists but could not store the event now: it has no leader reachable
    from this server (an election, a network partition), or JetStream itself cannot be
    reached from it. Retryable: the publish was retried until its timeout; publishing
    again with the same event id is safe (the stream stores it once)."""

    retryable = True


class PermissionDenied(MeshError):
    """The server refused a publish to this subject: the user lacks the permission."""


class JetStreamError(MeshError):
    """JetStream refused an API request (create a stream, read a message, ...).

    Args:
        message: what was attempted and the server's description.
        code: the HTTP-like status of the API error (e.g. 400, 404, 503), if any.
        err_code: JetStream's own error number (e.g. 10059 stream not found), if any.
    """

    def __init__(self, message: str, *, code: int | None = None, err_code: int | None = None):
        super().__init__(message)
        self.code = code
        self.err_code = err_code


class ConnectionFailed(MeshError, ConnectionError):
    """The first connection to NATS failed within the connect timeout; nothing was sent.

    The message names the URL(s) tried (credentials redacted), the last cause and how
    to point the framework elsewhere (`NATS_URL`). Reconnecting after a successful
    first connection is not bounded and never raises this.
    """


class AuthorizationFailed(ConnectionFailed, ConnectionRefusedError):
    """The server refused the credentials: retrying would not help."""


class ClientClosed(MeshError):
    """The client was closed (by `close()` or leaving `async with`); open a new one."""


class ConcurrencyConflict(PublishError):
    """A keyed event was not stored: the key has events newer than the writer had read.

    Raised by `publish(..., expected_last_subject_sequence=N)` when JetStream's last
    sequence of the key is not N. Read the key's history again, decide again, publish
    again (optimistic concurrency).

    Args:
        message: what was refused, with the server's description.
        subject: the event's subject.
        expected: the sequence the publisher expected.
        actual: the key's last sequence as the server reported it, when it did.
    """

    def __init__(
        self, message: str, *, subject: str, expected: int, actual: int | None = None
    ) -> None:
        super().__init__(message)
        self.subject = subject
        self.expected = expected
        self.actual = actual
