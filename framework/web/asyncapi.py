"""An AsyncAPI 3.0 document of services: their RPC endpoints, events and job kinds.

Built from `$SRV.INFO` answers (running services) or from `Service` objects (no server
needed), which carry the same facts: endpoint subjects, the JSON schemas of requests,
replies and events (ADR-32 metadata), the events a service publishes. Each schema's
`$defs` are hoisted into `components.schemas` so that `$ref`s resolve in the document.

Seen from the mesh as one application: an RPC endpoint is a `receive` operation with a
reply; a subscriber is a `receive` of its event type; a published event is a `send`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..rpc.discovery import InfoResponse, Responder
from ..transport.names import EVENT_PREFIX

if TYPE_CHECKING:
    from ..service import Service

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document", "describe_services"]

ASYNCAPI_VERSION = "3.0.0"
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def describe_services(services: Iterable[Service]) -> list[InfoResponse]:
    """What `$SRV.INFO` would answer for each service, without serving it."""
    described = []
    for service in services:
        handlers = [*service.endpoints, *service.subscribers, *getattr(service, "jobs", [])]
        responder = Responder(
            service.name,
            "-",
            service.version,
            service.description,
            service.metadata,
            handlers,
        )
        described.append(responder.info())
    return described


def _key(text: str) -> str:
    """A component or channel key: only `[A-Za-z0-9_-]` (dots would read as paths)."""
    return _SAFE.sub("_", text)


class _Builder:
    def __init__(self) -> None:
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}

    def schema(self, text: str | None) -> dict[str, Any]:
        """A schema from ADR-32 metadata, its `$defs` moved to components."""
        if not text:
            return {}
        try:
            schema = json.loads(text)
        except ValueError:
            return {}
        if not isinstance(schema, dict):
            return {}
        for name, definition in (schema.pop("$defs", None) or {}).items():
            self.schemas.setdefault(_key(name), _rewrite(definition))
        rewritten: dict[str, Any] = _rewrite(schema)
        return rewritten

    def message(self, key: str, title: str, schema: dict[str, Any]) -> dict[str, str]:
        """A message component (the first definition of a key wins); its `$ref`."""
        self.messages.setdefault(key, {"name": key, "title": title, "payload": schema})
        return {"$ref": f"#/components/messages/{key}"}

    def channel(self, key: str, address: str | None, messages: dict[str, Any], about: str) -> None:
        """A channel (`address` None: a reply inbox, known only at run time)."""
        channel = self.channels.setdefault(
            key, {"address": address, "messages": {}, "description": about}
        )
        channel["messages"].update(messages)

    def rpc(self, service: str, endpoint: Any) -> None:
        """An endpoint: `receive` on its subject, with a reply to the request's inbox."""
        meta = endpoint.metadata or {}
        key = _key(endpoint.subject)
        request = self.message(
            f"{key}_request", f"{endpoint.subject} request", self.schema(meta.get("request_schema"))
        )
        reply = self.message(
            f"{key}_reply", f"{endpoint.subject} reply", self.schema(meta.get("response_schema"))
        )
        self.channel(key, endpoint.subject, {"request": request}, f"RPC endpoint of {service}")
        self.channel(f"{key}_reply", None, {"reply": reply}, f"reply inbox of {endpoint.subject}")
        self.operations[f"{service}_{_key(endpoint.name)}"] = {
            "action": "receive",
            "title": f"{service}.{endpoint.name}",
            "summary": f"request-reply, queue group {endpoint.queue_group or service}",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/request"}],
            "reply": {
                "address": {"location": "$message.header#/replyTo"},
                "channel": {"$ref": f"#/channels/{key}_reply"},
                "messages": [{"$ref": f"#/channels/{key}_reply/messages/reply"}],
            },
        }

    def event(self, event_type: str, schema: dict[str, Any] | None) -> str:
        """The channel of an event type; a schema known from a subscriber is kept."""
        key = _key(f"{EVENT_PREFIX}.{event_type}")
        message_key = _key(event_type)
        existing = self.messages.get(message_key)
        if existing is not None and schema and not existing["payload"]:
            existing["payload"] = schema
        ref = self.message(message_key, event_type, schema or {})
        self.channel(key, f"{EVENT_PREFIX}.{event_type}", {"event": ref}, f"{event_type} events")
        return key

    def subscriber(self, service: str, endpoint: Any) -> None:
        """A subscriber: `receive` on its event type's channel."""
        meta = endpoint.metadata or {}
        event_type = meta.get("event_type") or endpoint.subject.removeprefix(f"{EVENT_PREFIX}.")
        key = self.event(event_type, self.schema(meta.get("event_schema")))
        self.operations[f"{service}_{_key(endpoint.name)}"] = {
            "action": "receive",
            "title": f"{service} handles {event_type}",
            "summary": f"durable consumer {meta.get('consumer', endpoint.queue_group)}"
            + (f" on stream {meta['stream']}" if meta.get("stream") else ""),
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/event"}],
        }

    def job(self, service: str, endpoint: Any) -> None:
        """A job kind: `receive` on its queue, the result schema as `x-result-schema`."""
        meta = endpoint.metadata or {}
        kind = meta.get("job_kind") or f"{service}.{endpoint.name}"
        key = _key(f"job.{kind}")
        payload = self.schema(meta.get("request_schema") or meta.get("payload_schema"))
        message = self.message(key, f"{kind} job", payload)
        self.channel(key, endpoint.subject, {"job": message}, f"jobs of kind {kind}")
        self.operations[f"{service}_job_{_key(endpoint.name)}"] = {
            "action": "receive",
            "title": f"job {kind}",
            "summary": "background job: one worker of the pool runs each",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/job"}],
            "x-job-kind": kind,
        }
        result = self.schema(meta.get("response_schema") or meta.get("result_schema"))
        if result:
            self.operations[f"{service}_job_{_key(endpoint.name)}"]["x-result-schema"] = result

    def publishes(self, service: str, event_types: Iterable[str]) -> None:
        """Events a service declares it publishes: `send` on their channels."""
        for event_type in event_types:
            key = self.event(event_type, None)
            self.operations[f"{service}_publishes_{_key(event_type)}"] = {
                "action": "send",
                "title": f"{service} publishes {event_type}",
                "channel": {"$ref": f"#/channels/{key}"},
                "messages": [{"$ref": f"#/channels/{key}/messages/event"}],
            }


def _rewrite(value: Any) -> Any:
    """`#/$defs/X` (msgspec's schemas) -> `#/components/schemas/X`."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                out[k] = "#/components/schemas/" + _key(v.removeprefix("#/$defs/"))
            else:
                out[k] = _rewrite(v)
        return out
    if isinstance(value, list):
        return [_rewrite(v) for v in value]
    return value


def asyncapi_document(
    services: Sequence[InfoResponse],
    *,
    title: str = "natsmesh services",
    version: str = "1.0.0",
    server: str | None = None,
) -> dict[str, Any]:
    """An AsyncAPI 3.0 document of `services` (one entry per service; replicas merged)."""
    builder = _Builder()
    seen: set[str] = set()
    for info in sorted(services, key=lambda i: i.name):
        if info.name in seen:
            continue
        seen.add(info.name)
        for endpoint in info.endpoints:
            kind = (endpoint.metadata or {}).get("kind", "rpc")
            {"subscriber": builder.subscriber, "job": builder.job}.get(kind, builder.rpc)(
                info.name, endpoint
            )
        published = (info.metadata or {}).get("publishes", "")
        builder.publishes(info.name, [t for t in published.split(",") if t])
    names = ", ".join(sorted(seen)) or "none"
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": f"Services: {names}. Payloads are JSON; errors follow the NATS "
            "service API (Nats-Service-Error-Code headers).",
        },
        "defaultContentType": "application/json",
        "channels": builder.channels,
        "operations": builder.operations,
        "components": {"messages": builder.messages, "schemas": builder.schemas},
    }
    if server:
        document["servers"] = {"nats": {"host": server, "protocol": "nats"}}
    return document
