"""A service: a name, RPC endpoints and event subscribers, served on one connection.

Handler names (the `name` of an endpoint, subscriber or job) are unique within a
service: `$SRV.INFO` and `mesh stats` list them side by side, so two named `get`
could not be told apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
from nats.errors import Error as NatsError

from .client import Client
from .context import Context
from .errors import InvalidName
from .events.options import SUBSCRIBE_DEFAULTS, SubscribeOptions
from .events.ownership import takeover_from_env
from .events.subscriber import Subscriber
from .jobs import options as job_options
from .jobs.worker import JobWorker
from .observability.logging import get_logger
from .rpc.discovery import Responder
from .rpc.endpoint import RpcEndpoint
from .transport.headers import new_id
from .transport.names import check_endpoint_name, check_event_type, check_service_name
from .transport.signature import Handler, read_signature
from .transport.wire_errors import mesh_error

if TYPE_CHECKING:
    from .streams import Stream

__all__ = ["Service"]

F = TypeVar("F", bound=Handler)
_log = get_logger("framework.service")

_KINDS = {"rpc": "an RPC endpoint", "subscriber": "a subscriber", "job": "a job"}
DEFAULT_RPC_CONCURRENCY = 100
DEFAULT_GRACE = 10.0


class Service:
    """Declare handlers with decorators; run with `run()`, `serve()` or `mesh run`.

    Args:
        name: the service's name: the first token of its RPC subjects, its queue
            group and part of its consumers' names (1-64 letters, digits, `_`, `-`).
        version: semantic version shown by `$SRV.INFO` and `mesh ls`.
        description: one line for `$SRV.INFO` and `mesh info`.
        metadata: extra `$SRV.INFO` metadata (string values, per ADR-32).
        streams: `Stream` declarations created (or checked) before serving.
        publishes: event types this service publishes; their domains' streams are
            created at start, so the first publish finds one.
        takeover: take over consumers that another program (or an older version) of
            this service set up, once per start; None reads `MESH_TAKEOVER`.
    """

    def __init__(
        self,
        name: str,
        version: str = "0.0.0",
        description: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        streams: Sequence[Stream] = (),
        publishes: Sequence[str] = (),
        takeover: bool | None = None,
    ) -> None:
        """`name` is what callers address and what replicas share; `version` (numbered,
        e.g. "1.2.0") is advertised by discovery and recorded as the owner of the
        service's consumers; `description` and `metadata` (string values) show in
        `$SRV.INFO`; `streams` declares event streams; `publishes` lists the event types
        the service publishes (their streams are ensured at start).

        One service name, one program: a consumer set up by another program (another
        event type or payload schema) is refused at start with `ConfigConflict`, and so
        are other settings from the same or an older `version` (a newer one applies them,
        logged). `takeover=True` takes the service's consumers over anyway, once per start
        (None: the `MESH_TAKEOVER` environment variable, as `mesh run --takeover` sets).
        """
        self.name = check_service_name(name)
        self.version = version
        self.takeover = takeover
        self.description = description
        self.metadata = dict(metadata or {})
        self.streams = list(streams)
        self.publishes = [check_event_type(t) for t in publishes]
        if self.publishes:
            self.metadata.setdefault("publishes", ",".join(self.publishes))
        self.endpoints: list[RpcEndpoint] = []
        self.subscribers: list[Subscriber] = []
        self.jobs: list[JobWorker] = []
        self.instance_id = ""
        self.client: Client | None = None
        self.connect_timeout: float | None = None  # for `run()`: see `serve()`

    def __repr__(self) -> str:
        return f"Service({self.name!r}, version={self.version!r})"

    def handlers(self) -> list[Any]:
        """Every named handler: RPC endpoints, subscribers and (when declared) jobs."""
        return [*self.endpoints, *self.subscribers, *self.jobs]

    def _check_unique(self, name: str, kind: str) -> None:
        """One name, one handler: `$SRV.INFO` lists them all side by side."""
        for other in self.handlers():
            if other.name == name:
                taken = _KINDS.get(getattr(other, "kind", ""), "a handler")
                raise InvalidName(
                    f"{self.name} already has {taken} named {name!r}; a {kind} cannot take "
                    "the name too (names are unique across a service's endpoints, "
                    "subscribers and jobs): pass name=... to one of them"
                )

    def rpc(
        self,
        name: str | None = None,
        *,
        max_concurrency: int = DEFAULT_RPC_CONCURRENCY,
        idempotent: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> Callable[[F], F]:
        """Serve the decorated handler at `<service>.<name>`, request-reply.

        The handler takes a payload (annotated with its type, e.g. a `msgspec.Struct`)
        and/or a `Context`; its return annotation is the reply's type. Raising a
        `ServiceError` answers with that code; any other exception answers 500 with an
        error id (the traceback is logged here, never sent).

        Args:
            name: the endpoint's name (default: the function's), unique among the
                service's endpoints, subscribers and jobs.
            max_concurrency: requests handled at once (>= 1, default 100); more wait.
            idempotent: replay the stored reply for a request whose
                `Idempotency-Key` was seen before (kept 24 h in a KV bucket).
            metadata: extra `$SRV.INFO` metadata for this endpoint.

        Raises:
            InvalidName: the name is not allowed or already taken in this service.
            InvalidHandler: the function is not async or its parameters are not
                annotated as a payload type and/or `Context`.
        """

        def decorate(fn: F) -> F:
            endpoint = check_endpoint_name(name or fn.__name__)
            self._check_unique(endpoint, "endpoint")
            if max_concurrency < 1:
                raise ValueError("max_concurrency must be at least 1")
            self.endpoints.append(
                RpcEndpoint(
                    self.name,
                    endpoint,
                    fn,
                    read_signature(fn, Context),
                    subject=f"{self.name}.{endpoint}",
                    max_concurrency=max_concurrency,
                    idempotent=idempotent,
                    metadata=metadata,
                )
            )
            return fn

        return decorate

    def subscribe(
        self,
        event_type: str,
        *,
        name: str | None = None,
        max_deliver: int = SUBSCRIBE_DEFAULTS.max_deliver,
        backoff: Sequence[float] = SUBSCRIBE_DEFAULTS.backoff,
        ack_wait: float = SUBSCRIBE_DEFAULTS.ack_wait,
        max_concurrency: int = SUBSCRIBE_DEFAULTS.max_concurrency,
        max_processing_time: float | None = SUBSCRIBE_DEFAULTS.max_processing_time,
        deliver: Literal["all", "new"] = SUBSCRIBE_DEFAULTS.deliver,
        idempotent: bool = SUBSCRIBE_DEFAULTS.idempotent,
        idempotency_ttl: float = SUBSCRIBE_DEFAULTS.idempotency_ttl,
        dead_letter: bool = SUBSCRIBE_DEFAULTS.dead_letter,
        ordered_by: Callable[[Any], Hashable] | None = SUBSCRIBE_DEFAULTS.ordered_by,
        max_ack_pending: int | None = SUBSCRIBE_DEFAULTS.max_ack_pending,
        max_unsettled: int | None = SUBSCRIBE_DEFAULTS.max_unsettled,
    ) -> Callable[[F], F]:
        """Handle every `event_type` event through a durable consumer shared by replicas.

        The handler takes the event (a type msgspec decodes) and optionally a `Context`.
        The consumer records this program as its owner (see `Service`). Options, with
        their defaults; one out of bounds raises `ValueError` here:

        - `name` (the function's name): the subscriber; its consumer is `<service>_<name>`.
        - `max_deliver` (5, >= 1): attempts before the event is dead-lettered.
        - `backoff` ((1, 5, 15, 60) s, each >= 0): `backoff[i]` is the delay before attempt
          i + 2; the last value repeats; empty: retry at once.
        - `ack_wait` (30 s, > 0): a delivery not acked by then is redelivered; a running
          handler's event is kept alive by in-progress acks every third of it.
        - `max_concurrency` (16, >= 1): handlers running at once in one replica.
        - `max_processing_time` (300 s, > 0; None: no limit): a handler running longer is
          cancelled, the attempt fails (`ProcessingTimeExceeded`).
        - `deliver` ("all", or "new"): where a new consumer starts (oldest or next event).
        - `idempotent` (True): an event whose id was already handled here is acked unrun.
        - `idempotency_ttl` (7 days, > 0): how long a handled event id is remembered.
        - `dead_letter` (True): an event given up on goes to `DEADLETTER`, then is terminated.
        - `ordered_by` (None, any function of the event returning a hashable key): events
          with equal keys run one at a time, in stream order, within one replica.
        - `max_ack_pending` (None: max(1000, 4 * max_concurrency); >= 1): deliveries the
          consumer leaves unacked at once, all replicas together.
        - `max_unsettled` (None: 8 * max_concurrency; >= max_concurrency): events of an
          idempotent subscriber handled or running, marker not yet stored, in one
          replica: what a crash can run twice. Wider stores markers in bigger batches.
        """
        check_event_type(event_type)
        # every keyword but `name` is a SubscribeOptions field, defaults read from it
        options = SubscribeOptions.pick(locals())
        return lambda handler: self._add_subscriber(event_type, name, options, handler)

    def _add_subscriber(
        self, event_type: str, name: str | None, options: SubscribeOptions, handler: F
    ) -> F:
        """`subscribe`'s decorator: the handler's signature is checked as it is declared."""
        subscriber_name = check_endpoint_name(name or handler.__name__)
        self._check_unique(subscriber_name, "subscriber")
        signature = read_signature(handler, Context)
        self.subscribers.append(
            Subscriber(self.name, subscriber_name, event_type, handler, signature, options)
        )
        return handler

    def job(
        self,
        name: str | None = None,
        *,
        max_concurrency: int = job_options.DEFAULT_MAX_CONCURRENCY,
        timeout: float | None = None,
        max_attempts: int = job_options.DEFAULT_MAX_ATTEMPTS,
        backoff: Sequence[float] = job_options.DEFAULT_BACKOFF,
        rate_limit: str | None = None,
        schedule: str | None = None,
        schedule_payload: Any = None,
        ack_wait: float = job_options.DEFAULT_ACK_WAIT,
    ) -> Callable[[F], F]:
        """Run the decorated handler for jobs of kind `<service>.<name>` (background jobs).

        The handler takes the payload and optionally a `JobContext`; its return value is
        the job's result. `max_concurrency`: jobs run at once per replica. `timeout`:
        seconds an attempt may take (None: no limit). `max_attempts`: attempts before the
        job fails and is dead-lettered; `backoff[i]`: seconds before attempt i + 2 (the
        last repeats). `rate_limit`: starts across all replicas, e.g. "20/s", "600/m".
        `schedule`: run it recurrently, "@every 1h", "@hourly" or a cron expression
        (seconds first), with `schedule_payload`. `ack_wait`: how long a crashed
        worker's job waits before another worker runs it.
        """
        options = job_options.JobOptions.build(
            max_concurrency=max_concurrency,
            timeout=timeout,
            max_attempts=max_attempts,
            backoff=backoff,
            rate_limit=rate_limit,
            schedule=schedule,
            schedule_payload=schedule_payload,
            ack_wait=ack_wait,
        )

        def decorate(fn: F) -> F:
            from .jobs.context import read_job_signature

            job_name = check_endpoint_name(name or fn.__name__)
            self._check_unique(job_name, "job")
            signature = read_job_signature(fn)
            worker = JobWorker(self.name, job_name, fn, signature, options, version=self.version)
            self.jobs.append(worker)
            return fn

        return decorate

    @asynccontextmanager
    async def serve(
        self,
        url_or_client: str | Sequence[str] | Client | None = None,
        *,
        grace: float = DEFAULT_GRACE,
        connect_timeout: float | None = None,
    ) -> AsyncIterator[Service]:
        """Serve inside the current event loop until the block exits, then stop gracefully.

        Streams, consumers and buckets are made (or checked) first: bad config raises here.

        Args:
            url_or_client: a NATS URL (or list), a `Client` to share (left open on
                exit), or None for `NATS_URL`.
            grace: seconds in-flight handlers get to finish on exit, then cancelled.
            connect_timeout: seconds the first connection may take (default
                `NATS_CONNECT_TIMEOUT`, else 5), then `ConnectionFailed`.

        Raises:
            ConnectionFailed: no NATS server answered in time (the URL is named).
            ConfigConflict: an existing stream or consumer differs from its declaration.
            MeshError: anything else the server refused while preparing.
        """
        client = await self._connect(url_or_client, connect_timeout)
        self.client = client
        self.instance_id = new_id()
        responder = Responder(
            self.name,
            self.instance_id,
            self.version,
            self.description,
            self.metadata,
            [*self.endpoints, *self.subscribers, *self.jobs],
        )
        try:
            await self._prepare(client)
            async with anyio.create_task_group() as task_group:
                try:
                    await self._start(client, task_group, responder)
                    _log.info("service started", service=self.name, id=self.instance_id)
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._stop(responder, grace)
                    task_group.cancel_scope.cancel()
        finally:
            if not isinstance(url_or_client, Client):
                with anyio.CancelScope(shield=True):
                    await client.close()

    async def _connect(
        self, url_or_client: str | Sequence[str] | Client | None, connect_timeout: float | None
    ) -> Client:
        if isinstance(url_or_client, Client):
            return url_or_client
        if connect_timeout is None:
            connect_timeout = self.connect_timeout
        return await Client.open(url_or_client, name=self.name, connect_timeout=connect_timeout)

    async def _prepare(self, client: Client) -> None:
        """Streams, consumers, buckets: fail with the real error before anything runs."""
        try:
            if self._uses_jetstream():
                from .streams import wait_for_jetstream

                await wait_for_jetstream(client)
            if self.subscribers or self.streams or self.publishes:
                from .streams import ensure_streams

                event_types = [*self.publishes, *(s.event_type for s in self.subscribers)]
                await ensure_streams(client, self.streams, event_types)
            takeover = takeover_from_env() if self.takeover is None else self.takeover
            for subscriber in self.subscribers:
                subscriber.owned_by(self.version, takeover=takeover)
            handlers: list[RpcEndpoint | Subscriber | JobWorker]
            handlers = [*self.endpoints, *self.subscribers, *self.jobs]
            for handler in handlers:
                await handler.prepare(client)
        except NatsError as exc:
            raise mesh_error(exc, f"preparing service {self.name}") from exc

    def _uses_jetstream(self) -> bool:
        """Streams, consumers, job queues or stored replies: JetStream must answer."""
        if self.subscribers or self.streams or self.publishes or self.jobs:
            return True
        return any(endpoint.idempotent for endpoint in self.endpoints)

    async def _start(self, client: Client, task_group: Any, responder: Responder) -> None:
        for endpoint in self.endpoints:
            await endpoint.start(client, task_group)
        for subscriber in self.subscribers:
            await subscriber.start(client, task_group)
        for worker in self.jobs:
            worker.instance_id = self.instance_id
            await worker.start(client, task_group)
        await responder.start(client.nc)
        # one round trip: the server has every subscription before serve() yields
        await client.nc.flush()

    async def _stop(self, responder: Responder, grace: float) -> None:
        """Stop intake everywhere first, then give in-flight work the grace period."""
        await responder.stop()
        results: list[bool] = []

        async def stop_one(handler: Any) -> None:
            results.append(await handler.stop(grace))

        async with anyio.create_task_group() as stopping:
            for handler in [*self.endpoints, *self.subscribers, *self.jobs]:
                stopping.start_soon(stop_one, handler)
        if not all(results):
            _log.warning("grace period over, cancelled in-flight handlers", service=self.name)
        _log.info("service stopped", service=self.name, id=self.instance_id)

    def run(
        self,
        url: str | Sequence[str] | None = None,
        *,
        grace: float = DEFAULT_GRACE,
        connect_timeout: float | None = None,
    ) -> None:
        """Run from `__main__` until SIGTERM or SIGINT, then shut down gracefully.

        Configures logging (`LOG_LEVEL`, `LOG_FORMAT`) and tracing (`MESH_TRACE_*`,
        `OTEL_*`) from the environment first, as `mesh run` does.

        Args:
            url: the NATS URL (or list); default `NATS_URL`.
            grace: seconds in-flight handlers get to finish after the signal.
            connect_timeout: seconds the first connection may take (default
                `NATS_CONNECT_TIMEOUT`, else 5), then `ConnectionFailed` is raised.
        """
        from .transport.process import run_services

        self.connect_timeout = connect_timeout
        run_services([self], url, grace=grace)
