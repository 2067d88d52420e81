"""Validation of everything that becomes part of a subject.

Subjects are built from service names, endpoint names and event types; a `*`, `>`,
`.` or space smuggled in from user input would change what a message reaches, so
names are checked once, when they are declared, never per message.
"""

from __future__ import annotations

import re

from ..errors import InvalidName

__all__ = [
    "EVENT_PREFIX",
    "ack_fields",
    "check_endpoint_name",
    "check_event_key",
    "check_event_type",
    "check_service_name",
    "check_subject",
    "check_token",
    "event_domain",
    "event_subject",
    "guard_subject",
    "key_subjects",
]

EVENT_PREFIX = "events"

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# domain.entity.action.vN, or entity.action.vN where the entity names the domain
# (the design's own examples: "order.created.v1" lands in the "order" domain).
_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*){1,2}\.v[0-9]+$")


def check_service_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(f"invalid service name {name!r}: use 1-64 letters, digits, '_' or '-'")
    return name


def check_endpoint_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"invalid endpoint name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(ADR-32 endpoint names match ^[a-zA-Z0-9_-]+$)"
        )
    return name


def check_token(value: str, what: str = "subject token") -> str:
    """A single subject token from user input: no wildcards, dots or whitespace."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidName(f"invalid {what} {value!r}: only letters, digits, '_' and '-' allowed")
    return value


def check_event_type(event_type: str) -> str:
    if not isinstance(event_type, str) or not _EVENT_TYPE.match(event_type):
        raise InvalidName(
            f"invalid event type {event_type!r}: expected lowercase "
            "[domain.]entity.action.vN, e.g. 'order.created.v1'"
        )
    return event_type


def event_domain(event_type: str) -> str:
    return event_type.split(".", 1)[0]


def event_subject(event_type: str, key: str | None = None) -> str:
    """Events live under their own prefix so a stream never captures RPC traffic; a keyed
    event adds its entity key as the last token (`events.order.created.v1.ord-1`)."""
    if key is None:
        return f"{EVENT_PREFIX}.{event_type}"
    return f"{EVENT_PREFIX}.{event_type}.{key}"


_KEY = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")


def check_event_key(key: str) -> str:
    """An entity key becomes one subject token: no dots, wildcards or whitespace."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise InvalidName(
            f"invalid event key {key!r}: use 1-128 letters, digits, '_', '=' or '-' "
            "(it becomes one subject token)"
        )
    return key


def key_subjects(type_or_domain: str, key: str) -> list[str]:
    """Subject filters of one key's events: of one type, or of every type of a domain.

    Types are `entity.action.vN` or `domain.entity.action.vN`, so a domain's keyed events
    sit two or three tokens below the domain (`events.order.*.*.<key>`).
    """
    check_event_key(key)
    if "." in type_or_domain:
        return [event_subject(check_event_type(type_or_domain), key)]
    domain = check_token(type_or_domain, "event domain")
    return [f"{EVENT_PREFIX}.{domain}.*.*.{key}", f"{EVENT_PREFIX}.{domain}.*.*.*.{key}"]


def guard_subject(event_type: str, key: str) -> str:
    """What `Nats-Expected-Last-Subject-Sequence` guards for a keyed event: the key's
    events of the type's domain with as many tokens as this type (`events.order.*.*.<key>`),
    i.e. the key's history as `key_subjects(domain, key)` reads it."""
    depth = event_type.count(".")  # tokens after the domain
    return ".".join([EVENT_PREFIX, event_domain(event_type), *["*"] * depth, key])


_SUBJECT = re.compile(r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*$")


_checked: set[str] = set()  # subjects called before (a few per caller): a set lookup
_MAX_CHECKED = 4096


def check_subject(subject: str) -> str:
    """A literal subject to send to: no wildcards, spaces or empty tokens."""
    if type(subject) is str and subject in _checked:
        return subject
    if not isinstance(subject, str) or len(subject) > 256 or not _SUBJECT.match(subject):
        raise InvalidName(
            f"invalid subject {subject!r}: dot-separated tokens of letters, digits, '_', '-' "
            "or '$'; no wildcards or spaces"
        )
    if len(_checked) < _MAX_CHECKED:
        _checked.add(subject)
    return subject


# tokens in a JetStream ack subject -> the index of its stream name: `$JS.ACK.<stream>...`
# (9 tokens), or with a domain and an account hash before the stream (11), and a random
# token at the end (12)
_ACK_STREAM_AT = {9: 2, 11: 4, 12: 4}


def ack_fields(reply: str) -> list[str] | None:
    """A delivery's ack subject as [stream, consumer, delivered, stream seq, consumer seq,
    timestamp ns, pending], or None for a form not known. One split: nats-py's
    `msg.metadata` builds dataclasses and a datetime per message, four times the cost."""
    tokens = reply.split(".")
    at = _ACK_STREAM_AT.get(len(tokens))
    return None if at is None else tokens[at : at + 7]
