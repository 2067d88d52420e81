"""The NATS service API (ADR-32): `$SRV.PING|INFO|STATS[.name[.id]]`.

Implemented here rather than by wrapping nats.py's `micro` (which runs handlers one at a
time) so that `nats micro ls`, nats.go, nats.js and nats.py clients see our services.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import msgspec
from nats.aio.client import Client as NATS

from ..observability.stats import HandlerStats
from ..types import Msg

__all__ = [
    "Divergence",
    "EndpointInfo",
    "EndpointStats",
    "InfoResponse",
    "PingResponse",
    "Responder",
    "StatsResponse",
    "divergences",
    "gather",
]

VERBS = ("PING", "INFO", "STATS")


class PingResponse(msgspec.Struct, kw_only=True):
    """One instance answering `$SRV.PING`: its service `name`, instance `id`, `version`."""

    name: str
    id: str
    version: str
    metadata: dict[str, str] = {}
    type: str = "io.nats.micro.v1.ping_response"


class EndpointInfo(msgspec.Struct, kw_only=True):
    """An endpoint or subscriber in `$SRV.INFO`: `metadata` holds its `kind`
    (`rpc`/`subscriber`) and JSON schemas (JSON-encoded strings, per ADR-32)."""

    name: str
    subject: str
    queue_group: str = ""
    metadata: dict[str, str] | None = None


class InfoResponse(msgspec.Struct, kw_only=True):
    """One instance answering `$SRV.INFO`: its identity and every endpoint it serves."""

    name: str
    id: str
    version: str
    description: str = ""
    metadata: dict[str, str] = {}
    endpoints: list[EndpointInfo] = []
    type: str = "io.nats.micro.v1.info_response"


class EndpointStats(msgspec.Struct, kw_only=True):
    """Counters of one endpoint or subscriber (times in nanoseconds, per ADR-32); `data`
    has the extras (`in_flight`; for subscribers consumer lag, redeliveries, dead letters)."""

    name: str
    subject: str
    queue_group: str = ""
    num_requests: int = 0
    num_errors: int = 0
    last_error: str = ""
    processing_time: int = 0  # nanoseconds, per ADR-32
    average_processing_time: int = 0
    data: dict[str, Any] | None = None


class StatsResponse(msgspec.Struct, kw_only=True):
    """One instance answering `$SRV.STATS`: when it `started` and its endpoints' counters."""

    name: str
    id: str
    version: str
    started: str
    metadata: dict[str, str] = {}
    endpoints: list[EndpointStats] = []
    type: str = "io.nats.micro.v1.stats_response"


class Listed(Protocol):
    """What discovery needs to know of an RPC endpoint or an event subscriber."""

    name: str
    subject: str
    queue_group: str
    stats: HandlerStats

    def metadata(self) -> dict[str, str]: ...

    def extra_stats(self) -> dict[str, Any] | None: ...


def subjects(name: str, instance_id: str) -> list[str]:
    return [
        subject
        for verb in VERBS
        for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{name}", f"$SRV.{verb}.{name}.{instance_id}")
    ]


def utc_timestamp() -> str:
    """RFC 3339 with microseconds and 'Z', the form nats.py's `ServiceStats` parses."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Responder:
    """Answers the service API for one service instance (no queue group: all reply)."""

    def __init__(
        self,
        name: str,
        instance_id: str,
        version: str,
        description: str,
        metadata: dict[str, str],
        handlers: Sequence[Listed],
    ) -> None:
        self._identity = dict(name=name, id=instance_id, version=version, metadata=metadata)
        self._description = description
        self._handlers = handlers
        self._started = utc_timestamp()
        self._subs: list[Any] = []

    async def start(self, nc: NATS) -> None:
        name, instance_id = self._identity["name"], self._identity["id"]
        assert isinstance(name, str) and isinstance(instance_id, str)
        for subject in subjects(name, instance_id):
            verb = subject.split(".")[1]
            self._subs.append(await nc.subscribe(subject, cb=self._callback(nc, verb)))

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # connection already closed: nothing to undo
                pass
        self._subs.clear()

    def _callback(self, nc: NATS, verb: str) -> Any:
        build = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]

        async def answer(msg: Msg) -> None:
            if not msg.reply:
                return
            if verb == "STATS":
                await self._refresh()
            await nc.publish(msg.reply, msgspec.json.encode(build()))

        return answer

    async def _refresh(self) -> None:
        """Figures that live on the server (consumer lag) are read when asked for."""
        for handler in self._handlers:
            refresh = getattr(handler, "refresh_stats", None)
            if refresh is not None:
                with contextlib.suppress(Exception):
                    await refresh()

    def ping(self) -> PingResponse:
        return PingResponse(**self._identity)  # type: ignore[arg-type]

    def info(self) -> InfoResponse:
        return InfoResponse(
            **self._identity,  # type: ignore[arg-type]
            description=self._description,
            endpoints=[
                EndpointInfo(
                    name=h.name, subject=h.subject, queue_group=h.queue_group, metadata=h.metadata()
                )
                for h in self._handlers
            ],
        )

    def stats(self) -> StatsResponse:
        return StatsResponse(
            **self._identity,  # type: ignore[arg-type]
            started=self._started,
            endpoints=[_endpoint_stats(h) for h in self._handlers],
        )


def _endpoint_stats(handler: Listed) -> EndpointStats:
    s = handler.stats
    return EndpointStats(
        name=handler.name,
        subject=handler.subject,
        queue_group=handler.queue_group,
        num_requests=s.num_requests,
        num_errors=s.num_errors,
        last_error=s.last_error,
        processing_time=s.processing_time,
        average_processing_time=s.average_processing_time,
        data=handler.extra_stats(),
    )


R = TypeVar("R", PingResponse, InfoResponse, StatsResponse)


async def gather(
    nc: NATS, verb: str, name: str | None, response_type: type[R], timeout: float
) -> list[R]:
    """Scatter-gather: every instance answers; collect what arrives within `timeout`."""
    subject = f"$SRV.{verb}" + (f".{name}" if name else "")
    decoder = msgspec.json.Decoder(response_type)
    inbox = nc.new_inbox()
    replies: list[R] = []
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:
                break
            try:
                replies.append(decoder.decode(msg.data))
            except msgspec.MsgspecError:
                continue  # a foreign responder speaking something else
    finally:
        await sub.unsubscribe()
    return sorted(replies, key=lambda r: (r.name, r.id))


class Divergence(msgspec.Struct, kw_only=True):
    """Instances of one service that advertise different versions or endpoint schemas:
    not replicas of one program, though the queue group shares requests between them."""

    service: str
    versions: dict[str, str]
    """Every instance's id, with its version."""
    differs: list[str]
    """What differs: "version", or "<endpoint>.<field>" (subject, request_schema,
    response_schema, event_schema; an endpoint some instances lack differs in subject)."""
    groups: list[list[str]]
    """Instance ids grouped by what they advertise: each group agrees within itself."""

    def describe(self) -> str:
        """One line for a terminal, naming the instances of each group."""
        groups = " vs ".join(
            "[" + ", ".join(f"{i} {self.versions[i]}" for i in group) + "]" for group in self.groups
        )
        return f"{self.service}: instances differ in {', '.join(self.differs)}: {groups}"


_ADVERTISED = ("request_schema", "response_schema", "event_schema")


def _advertised(info: InfoResponse) -> dict[str, str]:
    """What replicas of one program agree on: version, subjects and schemas."""
    face = {"version": info.version}
    for endpoint in info.endpoints:
        face[f"{endpoint.name}.subject"] = endpoint.subject
        metadata = endpoint.metadata or {}
        for key in _ADVERTISED:
            if key in metadata:
                face[f"{endpoint.name}.{key}"] = metadata[key]
    return face


def divergences(infos: Sequence[InfoResponse]) -> list[Divergence]:
    """The services among `$SRV.INFO` answers (`Client.info()`) whose instances differ.

    Replicas of one program advertise the same version and schemas; anything else means
    two programs share a service name (or an upgrade is rolling out), and requests to
    the name are answered by either.
    """
    by_service: dict[str, list[InfoResponse]] = {}
    for info in infos:
        by_service.setdefault(info.name, []).append(info)
    found: list[Divergence] = []
    for service, instances in sorted(by_service.items()):
        faces = [(info.id, _advertised(info)) for info in instances]
        keys = sorted({key for _, face in faces for key in face}, key=lambda k: (k != "version", k))
        differs = [k for k in keys if len({face.get(k) for _, face in faces}) > 1]
        if not differs:
            continue
        groups: dict[tuple[str | None, ...], list[str]] = {}
        for instance, face in faces:
            groups.setdefault(tuple(face.get(k) for k in differs), []).append(instance)
        found.append(
            Divergence(
                service=service,
                versions={info.id: info.version for info in instances},
                differs=differs,
                groups=list(groups.values()),
            )
        )
    return found
