"""A subscriber's durable consumer: its name, stream and configuration, kept as declared.

One durable pull consumer per (service, subscriber), shared by the service's replicas,
and by nothing else: the consumer's metadata records which program owns it
(ownership.py), and a starting subscriber joins, upgrades, adopts or takes it over by
that record's policy, or is refused with a `ConfigConflict`. Fields that change what the
consumer *is* (its filter, ack and deliver policies) must always match.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from ..errors import ConfigConflict, NoStream
from ..observability.logging import get_logger
from ..streams import differences
from .options import SubscribeOptions
from .ownership import Owner, Refused, Verdict, judge, schema_hash, shared_settings

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Consumer"]

_log = get_logger("framework.events.subscriber")

_FIXED = frozenset({"deliver_policy", "ack_policy", "filter_subjects"})
MAX_WAITING = 512  # pull requests the server keeps per consumer
ALREADY_EXISTS = 10148  # JetStream: a "create" found the consumer with another config


class Consumer:
    """Administration of one subscriber's durable consumer (and the subscriber's names
    and options, which its parts share); `pending`/`ack_pending` are its lag."""

    def __init__(
        self,
        service: str,
        name: str,
        event_type: str,
        subject: str,
        options: SubscribeOptions,
        *,
        schema: str = "{}",
        handler: str = "?",
    ) -> None:
        """`schema` is the payload's JSON schema, `handler` the handler's `module:qualname`:
        with the service's `version` (set before `ensure`) they say who owns the consumer."""
        self.service = service  # the subscriber's service and name
        self.name = name
        self.durable = f"{service}_{name}"
        self.stream = ""  # found by subject on `ensure`
        self.subject = subject
        self.event_type = event_type
        self.description = f"{service}.{name} handles {event_type}"
        self.options = options
        self.schema = schema_hash(schema)
        self.handler = handler
        self.version = "0.0.0"  # the service's, recorded as the owner's
        self.pending = 0  # not yet delivered: from each delivery, or the server when asked
        self.ack_pending = 0  # delivered, not yet acknowledged: from the server when asked
        self.lag_sequence = 0  # the stream sequence `pending` was read at

    @property
    def pull_subject(self) -> str:
        """Where pull requests for this consumer go."""
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"

    @property
    def what(self) -> str:
        """The consumer, as errors name it."""
        return f"consumer {self.stream}/{self.durable}"

    def owner(self) -> Owner:
        """This program, as the consumer's metadata records it."""
        return Owner(
            service=self.service,
            version=self.version,
            handler=self.handler,
            event_type=self.event_type,
            schema=self.schema,
            settings=shared_settings(self.options),
        )

    def config(self) -> api.ConsumerConfig:
        """The consumer as declared by the subscriber's options, with its owner."""
        options = self.options
        return api.ConsumerConfig(
            durable_name=self.durable,
            description=self.description,
            # unkeyed and keyed (`events.<type>.<key>`) events of the type alike
            filter_subjects=[self.subject, f"{self.subject}.>"],
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL
            if options.deliver == "all"
            else api.DeliverPolicy.NEW,
            ack_wait=options.ack_wait,
            # one more than ours: an attempt that crashed the process is dead-lettered next
            max_deliver=options.max_deliver + 1,
            max_ack_pending=options.ack_pending_limit,
            max_waiting=MAX_WAITING,
            metadata=self.owner().metadata(),
        )

    async def ensure(self, client: Client, *, takeover: bool = False) -> None:
        """Create the consumer, or join, adopt, upgrade or (`takeover`) take over the
        existing one by the ownership policy (`NoStream`, `ConfigConflict`)."""
        js = client.js
        if not self.stream:
            try:
                self.stream = await js.find_stream_name_by_subject(self.subject)
            except NotFoundError:
                raise NoStream(f"no stream captures {self.subject}") from None
        declared = self.config()
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            if await self._write(client, declared, "create"):
                return
            # another program (or a replica) created it meanwhile: judged like any other
            info = await js.consumer_info(self.stream, self.durable)
        await self._reconcile(client, info.config, declared, takeover)

    async def _write(self, client: Client, config: api.ConsumerConfig, action: str) -> bool:
        """Create (`action` "create": False when it exists, differently) or update
        ("update") the consumer. Spelled out because nats-py's `add_consumer` has no
        action: it creates or silently updates, so two first starts would race."""
        # the filter stays in the config, not the subject: a consumer may have several
        subject = f"$JS.API.CONSUMER.CREATE.{self.stream}.{self.durable}"
        body = {"stream_name": self.stream, "config": config.as_dict(), "action": action}
        reply = await client.nc.request(subject, json.dumps(body).encode(), timeout=5.0)
        error = json.loads(reply.data).get("error")
        if error is None:
            return True
        if action == "create" and error.get("err_code") == ALREADY_EXISTS:
            return False
        APIError.from_error(error)  # raises the specific error (NotFoundError, ...)
        raise APIError(**error)

    async def _reconcile(
        self,
        client: Client,
        existing: api.ConsumerConfig,
        declared: api.ConsumerConfig,
        takeover: bool,
    ) -> None:
        """Judge the existing consumer's owner and settings against ours (ownership.py),
        then check the fixed fields; write only what the verdict allows, and log it."""
        recorded = Owner.read(existing.metadata)
        mine = self.owner()
        have = _settings_of(existing, recorded)
        changes = {k: (have[k], v) for k, v in mine.settings.items() if k in have and have[k] != v}
        try:
            verdict = judge(recorded, mine, changes, takeover)
        except Refused as refused:
            raise ConfigConflict(self.what, refused.differences, hint=refused.hint) from None
        keyless = existing.filter_subject == self.subject and not existing.filter_subjects
        if keyless:  # made before event keys existed: it gains the keyed subject, nothing else
            upgraded = declared.filter_subjects
            existing = replace(existing, filter_subject=None, filter_subjects=upgraded)
            _log.info("consumer gains the keyed events' subject", consumer=self.durable)
        fixed = differences(existing, declared, sorted(_FIXED))
        if fixed:
            raise ConfigConflict(
                self.what,
                fixed,
                hint="These never change on a consumer: give the subscriber another name "
                f"(a new consumer), or delete this one (`nats consumer rm {self.stream} "
                f"{self.durable}`) to have it created again.",
            )
        if verdict is not Verdict.KEEP or keyless:
            await self._write(client, declared, "update")
        if verdict is not Verdict.KEEP:
            self._log_verdict(verdict, recorded, mine, changes)

    def _log_verdict(
        self,
        verdict: Verdict,
        recorded: Owner | None,
        mine: Owner,
        changes: dict[str, tuple[Any, Any]],
    ) -> None:
        """Adopting and recording a version are routine (INFO); changed settings or a
        takeover are what an operator must be able to find (WARNING, with the diff)."""
        where = {"consumer": self.durable, "stream": self.stream, "owner": mine.describe()}
        shown = {k: {"was": a, "now": b} for k, (a, b) in changes.items()}
        was = recorded.describe() if recorded is not None else None
        if verdict is Verdict.ADOPT:
            _log.info("consumer adopted: its owner is now recorded", **where)
            if changes:
                _log.warning("consumer settings updated", changes=shown, **where)
        elif verdict is Verdict.RECORD:
            _log.info("consumer owner's newer version recorded", was=was, **where)
        elif verdict is Verdict.UPGRADE:
            _log.warning(
                "consumer settings updated by a newer version", was=was, changes=shown, **where
            )
        else:
            _log.warning("consumer taken over", was=was, changes=shown, **where)

    async def refresh(self, js: JetStreamContext) -> None:
        """Lag from the consumer itself: what the stream holds that we have not taken."""
        if not self.stream:
            return
        info = await js.consumer_info(self.stream, self.durable, timeout=0.5)
        self.pending = info.num_pending or 0
        self.ack_pending = info.num_ack_pending or 0


def _settings_of(config: api.ConsumerConfig, recorded: Owner | None) -> dict[str, Any]:
    """The settings a consumer has: its record's, overlaid with what the server holds (the
    consumer may have been edited by hand; a consumer without a record has only these)."""
    settings = dict(recorded.settings) if recorded is not None else {}
    if config.max_deliver is not None:
        deliver = config.max_deliver
        settings["max_deliver"] = deliver - 1 if deliver > 0 else deliver
    if config.ack_wait is not None:
        settings["ack_wait"] = round(config.ack_wait, 3)
    if config.max_ack_pending is not None:
        settings["max_ack_pending"] = config.max_ack_pending
    return settings
