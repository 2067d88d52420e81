"""A subscriber's durable consumer: its name, stream and configuration, kept as declared.

One durable pull consumer per (service, subscriber), shared by the service's replicas.
Fields that change what the consumer *is* (its filter, ack and deliver policies) must
match an existing one (`ConfigConflict`); tunables are updated in place, and logged.
"""

from __future__ import annotations

import structlog
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from ..errors import ConfigConflict, NoStream
from ..streams import differences
from .options import SubscribeOptions

__all__ = ["Consumer"]

_log = structlog.get_logger("framework.events.subscriber")

_FIXED = frozenset({"deliver_policy", "ack_policy", "filter_subject"})
_TUNABLE = frozenset({"ack_wait", "max_deliver", "max_ack_pending"})
MAX_WAITING = 512  # pull requests the server keeps per consumer


class Consumer:
    """Administration of one subscriber's durable consumer (and the subscriber's names
    and options, which its parts share); `pending`/`ack_pending` are its lag."""

    def __init__(
        self, service: str, name: str, event_type: str, subject: str, options: SubscribeOptions
    ) -> None:
        self.service = service  # the subscriber's service and name
        self.name = name
        self.durable = f"{service}_{name}"
        self.stream = ""  # found by subject on `ensure`
        self.subject = subject
        self.description = f"{service}.{name} handles {event_type}"
        self.options = options
        self.pending = 0  # not yet delivered: from each delivery, or the server when asked
        self.ack_pending = 0  # delivered, not yet acknowledged: from the server when asked
        self.lag_sequence = 0  # the stream sequence `pending` was read at

    @property
    def pull_subject(self) -> str:
        """Where pull requests for this consumer go."""
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"

    def config(self) -> api.ConsumerConfig:
        """The consumer as declared by the subscriber's options."""
        options = self.options
        return api.ConsumerConfig(
            durable_name=self.durable,
            description=self.description,
            filter_subject=self.subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL
            if options.deliver == "all"
            else api.DeliverPolicy.NEW,
            ack_wait=options.ack_wait,
            # one more than ours: an attempt that crashed the process is dead-lettered next
            max_deliver=options.max_deliver + 1,
            max_ack_pending=options.ack_pending_limit,
            max_waiting=MAX_WAITING,
        )

    async def ensure(self, js: JetStreamContext) -> None:
        """Create the consumer, or reconcile the existing one (`NoStream`, `ConfigConflict`)."""
        if not self.stream:
            try:
                self.stream = await js.find_stream_name_by_subject(self.subject)
            except NotFoundError:
                raise NoStream(f"no stream captures {self.subject}") from None
        declared = self.config()
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            await js.add_consumer(self.stream, declared)
            return
        await self._reconcile(js, info.config, declared)

    async def _reconcile(
        self, js: JetStreamContext, existing: api.ConsumerConfig, declared: api.ConsumerConfig
    ) -> None:
        """Fixed fields must match; tunables are updated, and the change is logged."""
        diff = differences(existing, declared, sorted(_FIXED | _TUNABLE))
        conflicts = {k: v for k, v in diff.items() if k in _FIXED}
        if conflicts:
            raise ConfigConflict(f"consumer {self.stream}/{self.durable}", conflicts)
        if diff:
            await js.add_consumer(self.stream, declared)
            _log.warning(
                "consumer config updated",
                consumer=self.durable,
                changes={k: {"was": a, "now": b} for k, (a, b) in diff.items()},
            )

    async def refresh(self, js: JetStreamContext) -> None:
        """Lag from the consumer itself: what the stream holds that we have not taken."""
        if not self.stream:
            return
        info = await js.consumer_info(self.stream, self.durable, timeout=0.5)
        self.pending = info.num_pending or 0
        self.ack_pending = info.num_ack_pending or 0
