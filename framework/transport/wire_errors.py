"""The one place where what NATS says about a failure becomes an exception.

Failures come back in four shapes, each read here and nowhere else:

- ADR-32 error headers on a reply (`Nats-Service-Error`, `Nats-Service-Error-Code`):
  `service_error` rebuilds the `ServiceError` subclass the handler raised.
- JetStream status replies (a `Status` header: 503 no responders, 404, 408) and API
  error bodies (`{"error": {"code", "err_code", "description"}}`): `status_error` and
  `pub_ack_error`. Internal machinery decides on retries with these, so they keep
  nats-py's classes (`NoRespondersError`, `APIError`).
- nats-py exceptions: `publish_error` (an event not stored), `mesh_error` (anything
  else) turn them into framework errors where they would leave the public API.
- The server's `-ERR` lines handed to the error callback: `denied_subject` and
  `is_authorization_violation` read permission and credential refusals.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from ..errors import (
    ClientClosed,
    ConcurrencyConflict,
    JetStreamError,
    MeshError,
    NoStream,
    NotFound,
    PermissionDenied,
    PublishError,
    ServiceError,
    error_from_code,
)
from .headers import ERROR, ERROR_CODE

if TYPE_CHECKING:
    from nats.aio.msg import Msg

__all__ = [
    "PubAck",
    "api_error",
    "decode_pub_ack",
    "denied_subject",
    "is_authorization_violation",
    "mesh_error",
    "pub_ack_error",
    "publish_error",
    "read_pub_ack",
    "service_error",
    "service_of",
    "status_error",
]

_STATUS = "Status"
_DESCRIPTION = "Description"


def service_of(subject: str) -> str:
    """The service a `<service>.<endpoint>` subject belongs to."""
    return subject.split(".", 1)[0]


# -- ADR-32 ---------------------------------------------------------------------------


def service_error(headers: Mapping[str, str] | None, subject: str) -> ServiceError | None:
    """The typed error an ADR-32 reply carries, or None for a successful reply."""
    if not headers:
        return None
    code = headers.get(ERROR_CODE)
    if code is None:
        return None
    try:
        status = int(code)
    except ValueError:
        status = 500
    return error_from_code(status, headers.get(ERROR, ""), service=service_of(subject))


# -- JetStream replies (internal: nats-py classes) --------------------------------------


def status_error(msg: Msg) -> Exception:
    """A JetStream status reply (no body, a `Status` header) as nats-py's exception."""
    headers = msg.headers or {}
    status = headers.get(_STATUS, "")
    if status == "503":
        return NoRespondersError()
    code = int(status) if status.isdigit() else None
    return APIError(code=code, description=headers.get(_DESCRIPTION) or None)


class PubAck(msgspec.Struct):
    """JetStream's answer to a publish: where it was stored, or why not."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


decode_pub_ack = msgspec.json.Decoder(PubAck).decode


def api_error(error: Mapping[str, Any]) -> APIError:
    """The `error` object of a JetStream API reply as nats-py's `APIError`."""
    return APIError(
        code=error.get("code"),
        description=error.get("description"),
        err_code=error.get("err_code"),
    )


def pub_ack_error(reply: Msg) -> Exception | None:
    """What is wrong with a JetStream publish's reply, None for a PubAck."""
    if not reply.data:
        return status_error(reply)  # 503: no stream listens
    try:
        ack = decode_pub_ack(reply.data)
    except msgspec.MsgspecError:
        return APIError(description=f"invalid PubAck: {reply.data[:200]!r}")
    return None if ack.error is None else api_error(ack.error)


def read_pub_ack(reply: Msg) -> PubAck:
    """The PubAck of a publish's reply; raises nats-py's exception when it is an error."""
    error = pub_ack_error(reply)
    if error is not None:
        raise error
    return decode_pub_ack(reply.data)


# -- nats-py exceptions to framework errors ----------------------------------------------


_NO_STORAGE = 10023  # JetStream's "insufficient resources": the server's store is full
WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream: an expected-sequence check failed


def publish_error(subject: str, exc: BaseException, expected: str | None = None) -> PublishError:
    """Why an event to `subject` was not (known to be) stored, as a `PublishError`;
    `expected` is the `Nats-Expected-Last-Subject-Sequence` it was sent with, if any."""
    if isinstance(exc, PublishError):
        return exc
    if isinstance(exc, APIError) and exc.err_code in WRONG_LAST_SEQUENCE:
        return _conflict(subject, exc, expected)
    if isinstance(exc, NoStreamResponseError | NoRespondersError):
        return NoStream(
            f"no stream captures {subject}: declare a Stream for its domain or start a "
            "service that subscribes to it (the event was not stored)"
        )
    if isinstance(exc, PermissionDenied):
        return PublishError(f"permission denied, the event was not stored: {exc}")
    if isinstance(exc, NatsTimeoutError | TimeoutError):
        return PublishError(f"no acknowledgement from JetStream for {subject} (not known stored)")
    if isinstance(exc, ConnectionClosedError):
        return PublishError(f"publish to {subject} failed: the client is closed")
    if isinstance(exc, APIError) and exc.err_code == _NO_STORAGE:
        return PublishError(
            f"JetStream has no storage left for {subject} (insufficient resources): the event "
            "was not stored; free space on the server or raise its max_file_store"
        )
    if isinstance(exc, APIError):
        return PublishError(f"publish to {subject} failed: {_describe(exc)}")
    return PublishError(f"publish to {subject} failed: {exc}")


def _conflict(subject: str, exc: APIError, expected: str | None) -> ConcurrencyConflict:
    actual = (exc.description or "").rpartition(":")[2].strip()
    return ConcurrencyConflict(
        f"{subject} not stored: expected last sequence {expected}, "
        f"the server has {actual or 'another'} ({exc.description})",
        subject=subject,
        expected=int(expected) if expected and expected.isdigit() else -1,
        actual=int(actual) if actual.isdigit() else None,
    )


def _describe(exc: APIError) -> str:
    parts = [exc.description or type(exc).__name__]
    if exc.code:
        parts.append(f"status {exc.code}")
    if exc.err_code:
        parts.append(f"err_code {exc.err_code}")
    return ", ".join(parts)


def mesh_error(exc: BaseException, doing: str) -> BaseException:
    """`exc` as a framework error if it is a nats-py one (else unchanged); `doing` says
    what was attempted, e.g. "reading dead letter 7"."""
    if isinstance(exc, MeshError) or not isinstance(exc, NatsError):
        return exc
    if isinstance(exc, ConnectionClosedError):
        return ClientClosed(f"{doing}: the client is closed")
    if isinstance(exc, NotFoundError):
        return NotFound(f"{doing}: {exc.description or 'not found'}")
    if isinstance(exc, APIError):
        return JetStreamError(f"{doing}: {_describe(exc)}", code=exc.code, err_code=exc.err_code)
    if isinstance(exc, NoRespondersError):
        return JetStreamError(
            f"{doing}: no responders (is JetStream enabled on the server?)", code=503
        )
    if isinstance(exc, NatsTimeoutError):
        return JetStreamError(f"{doing}: no answer from the server in time", code=408)
    return MeshError(f"{doing}: {type(exc).__name__}: {exc}")


# -- the error callback -------------------------------------------------------------------

_DENIED = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)


def denied_subject(error: Exception) -> str | None:
    """The subject of a 'Permissions Violation for Publish to "x"' error, else None."""
    match = _DENIED.search(str(error))
    return match.group(1) if match else None


def is_authorization_violation(error: Exception) -> bool:
    """The server refused the credentials (wrong user, password, token or nkey)."""
    return "authorization violation" in str(error).lower()
