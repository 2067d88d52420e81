"""Which program owns a durable consumer, recorded in the consumer's metadata.

Replicas of a service share its consumers: that is how they share the work. A second,
different program that takes the same service name would share them too, so it would
take half the events (its handler failing on payloads it does not understand) and its
options would rewrite the consumer's. So each consumer records who set it up, as string
values in its metadata (like ADR-32 endpoint metadata): the handler's event type, a hash
of the payload's JSON schema, the service version, the handler's code and the settings
replicas must agree on. A starting subscriber is judged against that record
(`judge`): one service name, one program.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .options import SubscribeOptions

__all__ = [
    "TAKEOVER_ENV",
    "Owner",
    "Refused",
    "Verdict",
    "is_newer",
    "judge",
    "schema_hash",
    "shared_settings",
    "takeover_from_env",
]

TAKEOVER_ENV = "MESH_TAKEOVER"
"""`1` (or `true`, `yes`): services of this process take over their consumers."""

PREFIX = "mesh."  # our keys in the consumer's metadata (the server adds `_nats.*` ones)
TAKEOVER_HINT = (
    "take the consumer over on purpose: Service(..., takeover=True), "
    f"{TAKEOVER_ENV}=1 or `mesh run --takeover`"
)


def takeover_from_env() -> bool:
    """Whether `MESH_TAKEOVER` asks for a takeover (`1`, `true`, `yes`)."""
    return os.environ.get(TAKEOVER_ENV, "").strip().lower() in ("1", "true", "yes")


def schema_hash(schema_json: str) -> str:
    """A short, stable digest of a payload's JSON schema: equal schemas, equal hashes."""
    return hashlib.sha256(schema_json.encode()).hexdigest()[:16]


def shared_settings(options: SubscribeOptions) -> dict[str, Any]:
    """The options every replica must agree on, as JSON values.

    `max_concurrency`, `max_unsettled` and `ordered_by` are left out: they act within
    one replica, so replicas on machines of different sizes may differ. `deliver` is fixed on the
    consumer itself (a `ConfigConflict` when it differs). `max_ack_pending` is the
    effective limit, so replicas differing in `max_concurrency` above 250 (which raises
    the default limit) must set it explicitly.
    """
    return {
        "max_deliver": options.max_deliver,
        "backoff": [round(delay, 3) for delay in options.backoff],
        "ack_wait": round(options.ack_wait, 3),
        "max_ack_pending": options.ack_pending_limit,
        "max_processing_time": options.max_processing_time,
        "idempotent": options.idempotent,
        "idempotency_ttl": round(options.idempotency_ttl, 3),
        "dead_letter": options.dead_letter,
    }


@dataclass(frozen=True, kw_only=True)
class Owner:
    """The program behind a consumer: what it records, and what a starting one declares."""

    service: str
    """The service name (also the consumer name's prefix)."""
    version: str
    """The service's version: a newer one may change the settings (see `judge`)."""
    handler: str
    """The handler's `module:qualname`: named in conflicts, not compared (the same
    program may be started as a script or as a module)."""
    event_type: str
    """The event type the handler takes."""
    schema: str
    """`schema_hash` of the handler's payload type."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """`shared_settings` of the handler's options."""

    def metadata(self) -> dict[str, str]:
        """The record, as consumer metadata (string values)."""
        settings = json.dumps(dict(self.settings), sort_keys=True, separators=(",", ":"))
        return {
            f"{PREFIX}service": self.service,
            f"{PREFIX}version": self.version,
            f"{PREFIX}handler": self.handler,
            f"{PREFIX}event_type": self.event_type,
            f"{PREFIX}schema": self.schema,
            f"{PREFIX}settings": settings,
        }

    @classmethod
    def read(cls, metadata: Mapping[str, str] | None) -> Owner | None:
        """The record in a consumer's metadata; None for a consumer without one (made by
        an older framework version, or by hand)."""
        values = {k[len(PREFIX) :]: v for k, v in (metadata or {}).items() if k.startswith(PREFIX)}
        if "event_type" not in values or "schema" not in values:
            return None
        try:
            settings = json.loads(values.get("settings", "{}"))
        except ValueError:
            settings = {}
        return cls(
            service=values.get("service", ""),
            version=values.get("version", ""),
            handler=values.get("handler", "?"),
            event_type=values["event_type"],
            schema=values["schema"],
            settings=settings if isinstance(settings, dict) else {},
        )

    def compatible(self, other: Owner) -> bool:
        """The same events, decoded the same way: replicas of one program."""
        return (self.event_type, self.schema) == (other.event_type, other.schema)

    def describe(self) -> str:
        """One line naming the program, for logs and errors."""
        return (
            f"{self.service} {self.version} (handler {self.handler}, "
            f"event {self.event_type}, payload schema {self.schema})"
        )


class Verdict(enum.Enum):
    """What a starting subscriber does with an existing consumer."""

    KEEP = "keep"  # the same program, the same settings: join
    RECORD = "record"  # the same settings, a newer version: record the version (INFO)
    ADOPT = "adopt"  # a consumer without a record: record ours (INFO)
    UPGRADE = "upgrade"  # a newer version with other settings: apply them (WARNING)
    TAKEOVER = "takeover"  # asked for: apply ours whatever the record says (WARNING)


class Refused(Exception):
    """`judge` refuses: `differences` are (the consumer's, ours); `hint` says what to do."""

    def __init__(self, differences: dict[str, tuple[Any, Any]], hint: str) -> None:
        super().__init__(hint)
        self.differences = differences
        self.hint = hint


def judge(
    existing: Owner | None, mine: Owner, changes: Mapping[str, tuple[Any, Any]], takeover: bool
) -> Verdict:
    """The ownership policy (`Refused` when the consumer is not ours to join or change).

    - No record: adopt the consumer (an older framework made it), applying our settings.
    - Another program (other event type or payload schema): refused, unless `takeover`.
    - The same program with other settings (`changes`): a newer version applies them,
      so an upgrade rolls out; the same or an older one is refused (a stale replica must
      not roll settings back), unless `takeover`.
    - Otherwise join; a newer version is recorded.
    """
    if existing is None:
        return Verdict.ADOPT
    if not existing.compatible(mine):
        if takeover:
            return Verdict.TAKEOVER
        raise Refused(_identity_differences(existing, mine), _other_program_hint(existing, mine))
    if changes:
        if takeover:
            return Verdict.TAKEOVER
        if is_newer(mine.version, existing.version):
            return Verdict.UPGRADE
        raise Refused(dict(changes), _settings_hint(existing, mine))
    return Verdict.RECORD if is_newer(mine.version, existing.version) else Verdict.KEEP


def _identity_differences(existing: Owner, mine: Owner) -> dict[str, tuple[Any, Any]]:
    """What makes them different programs (the hint names the rest of both)."""
    pairs = {
        "event_type": (existing.event_type, mine.event_type),
        "payload schema": (existing.schema, mine.schema),
    }
    return {k: v for k, v in pairs.items() if v[0] != v[1]}


def _other_program_hint(existing: Owner, mine: Owner) -> str:
    return (
        f"It belongs to {existing.describe()}; this program declares {mine.describe()}. "
        "Two programs under one service name would split its events between them. "
        f"Give this service (or handler) a name of its own, or {TAKEOVER_HINT}."
    )


def _settings_hint(existing: Owner, mine: Owner) -> str:
    return (
        f"Its settings were set by {existing.describe()}; this program "
        f"({mine.service} {mine.version}) declares others, and replicas of one service "
        "must agree. To change them on purpose, raise the service's version (a newer "
        f"version applies its settings, logged), or {TAKEOVER_HINT}."
    )


_VERSION = re.compile(r"v?(\d+(?:\.\d+)*)(?:[-.]?([0-9A-Za-z.-]+))?(?:\+.*)?")


def _version_key(version: str) -> tuple[tuple[int, ...], int, str] | None:
    """Release numbers (trailing zeros dropped), then a final release above its
    pre-releases; None for a version that is not numbered."""
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        return None
    release = [int(part) for part in match.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre = match.group(2) or ""
    return (tuple(release), 0 if pre else 1, pre)


def is_newer(version: str, than: str) -> bool:
    """`version` is a later release than `than` (`1.2.0` > `1.1.9` > `1.1.9-rc1`); False
    when either is not a numbered version, so unnumbered code never upgrades by itself."""
    a, b = _version_key(version), _version_key(than)
    return a is not None and b is not None and a > b
