"""`mesh replay`: run a service's subscribers over their streams until they catch up.

    mesh replay MODULE:ATTR --handler GLOB [--handler GLOB ...] [--timeout SECONDS]

What rebuilding a read model takes: its subscribers, declared with `deliver="all"` under
a new name (a new generation), get new durable consumers that start at the stream's
first event. `mesh replay` serves just those subscribers of the service (no endpoints),
waits until every one of their consumers has nothing pending and nothing unacknowledged,
prints what each handled, and stops. The consumers stay: the service, started with the
new names, continues from where the replay stopped. While it runs the replay answers
discovery as one more instance of the service.

Exit codes as every `mesh` command: 0 caught up, 2 usage (no such spec or handler),
4 not caught up within `--timeout`, 7 no connection.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ..service import Service
from ._common import CliError, ExitCode, add_command, load_spec, seconds, with_client

if TYPE_CHECKING:
    from ..client import Client
    from ..events.subscriber import Subscriber
    from ._common import Handler, Subparsers

__all__ = ["caught_up", "register", "replay", "select_subscribers"]

POLL = 0.25


def select_subscribers(service: Service, patterns: Sequence[str]) -> list[Subscriber]:
    """The service's subscribers whose names match any of the glob patterns."""
    chosen = [
        s for s in service.subscribers if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)
    ]
    if not chosen:
        names = ", ".join(s.name for s in service.subscribers) or "none"
        raise CliError(
            f"no subscriber of {service.name} matches {', '.join(patterns)} (it has: {names})",
            ExitCode.USAGE,
        )
    return chosen


async def caught_up(client: Client, subscribers: Sequence[Subscriber]) -> dict[str, int] | None:
    """Deliveries per subscriber's consumer once none has anything pending or
    unacknowledged; None while one still has."""
    handled: dict[str, int] = {}
    for subscriber in subscribers:
        info = await client.js.consumer_info(subscriber.stream, subscriber.durable)
        if info.num_pending or info.num_ack_pending:
            return None
        handled[subscriber.name] = info.delivered.consumer_seq or 0
    return handled


async def replay(
    client: Client, service: Service, patterns: Sequence[str], timeout: float, out: Any = print
) -> dict[str, int]:
    """Serve the chosen subscribers of `service` until they have caught up (`TimeoutError`
    after `timeout` seconds); events handled per subscriber."""
    chosen = select_subscribers(service, patterns)
    replica = Service(service.name, service.version, service.description, streams=service.streams)
    replica.subscribers = chosen
    started = time.monotonic()
    async with replica.serve(client):
        out(f"replaying {', '.join(s.name for s in chosen)} of {service.name}")
        with anyio.fail_after(timeout):
            handled = await _wait_caught_up(client, chosen)
    took = time.monotonic() - started
    for name, count in handled.items():
        out(f"{name}: {count} deliveries, caught up")
    out(f"replayed in {took:.1f}s")
    return handled


async def _wait_caught_up(client: Client, chosen: Sequence[Subscriber]) -> dict[str, int]:
    """The consumers' state lives in the server: asked for every POLL seconds."""
    while True:
        handled = await caught_up(client, chosen)
        if handled is not None:
            return handled
        await anyio.sleep(POLL)


def cmd_replay(args: argparse.Namespace) -> int:
    service = load_spec(args.spec)
    if not isinstance(service, Service):
        raise CliError(f"{args.spec!r} is not a Service", ExitCode.USAGE)
    select_subscribers(service, args.handlers)  # a usage error before connecting

    async def body(client: Client) -> int:
        try:
            await replay(client, service, args.handlers, args.timeout)
        except TimeoutError:
            raise CliError(
                f"not caught up within {args.timeout:g}s (the consumers stay; run it again)",
                ExitCode.TIMEOUT,
            ) from None
        return int(ExitCode.OK)

    return with_client(args, body)


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    parser = add_command(
        subparsers,
        "replay",
        "run subscribers of a service until they catch up (rebuild a view)",
        codes=(ExitCode.OK, ExitCode.USAGE, ExitCode.TIMEOUT, ExitCode.NO_CONNECTION),
        notes={ExitCode.OK: "caught up", ExitCode.TIMEOUT: "not caught up within --timeout"},
        examples=["mesh replay services.orders:service --handler 'view_v1_*'"],
    )
    parser.add_argument(
        "spec", metavar="MODULE:ATTR", help="the service, e.g. services.orders:service"
    )
    parser.add_argument(
        "--handler",
        dest="handlers",  # (`handler` is the command's own, in `mesh`'s parser)
        action="append",
        required=True,
        metavar="GLOB",
        help="subscribers to run, by name or glob (repeatable), e.g. 'view_v2_*'",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="give up if not caught up by then (default: 300)",
    )
    return {"replay": cmd_replay}
