"""`mesh run|call|ls|info|stats`: run services, call them, see what runs.

mesh run MODULE:ATTR [MODULE:ATTR ...] [--workers N|auto] [--grace SECONDS] [--app-dir DIR]
         [--takeover]
mesh call SUBJECT [JSON|-] [--timeout SECONDS] [--header K=V ...]
mesh ls [--json]
mesh info [NAME] [--json]
mesh stats [NAME] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ConfigConflict, InvalidName
from ..events.ownership import TAKEOVER_ENV
from ._common import (
    CliError,
    ExitCode,
    Handler,
    Subparsers,
    add_command,
    add_connection_options,
    check_service_name_arg,
    discovery_timeout,
    grace_seconds,
    load_spec,
    one_line,
    parse_headers,
    positive_int,
    print_json,
    print_result,
    read_payload,
    table,
    with_client,
)

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["cmd_call", "cmd_info", "cmd_ls", "cmd_run", "cmd_stats", "register", "workers"]

LAST_ERROR_WIDTH = 60
CALL_TIMEOUT_HELP = "seconds to wait for the reply, sent as the deadline (default: 5)"

# What a subscriber adds to its endpoint stats `data` (consumer lag and failures).
_SUBSCRIBER_STATS = (
    ("pending", "PENDING"),
    ("redelivered", "REDELIVERED"),
    ("dead_lettered", "DEAD-LETTERED"),
)

_DISCOVERY_CODES = (
    ExitCode.OK,
    ExitCode.FAILURE,
    ExitCode.USAGE,
    ExitCode.NOT_FOUND,
    ExitCode.NO_CONNECTION,
    ExitCode.INTERRUPTED,
)


# --- run ------------------------------------------------------------------------------


def workers(text: str) -> int:
    """argparse type of `--workers`: a count, or `auto` for one per CPU core."""
    if text == "auto":
        return os.cpu_count() or 1
    return positive_int(text)


def cmd_run(args: argparse.Namespace) -> int:
    """Serve the services here (one worker) or in `--workers` supervised processes."""
    from ..runner import run_services, run_workers

    if args.app_dir:
        sys.path.insert(0, os.path.abspath(args.app_dir))
    services = [load_spec(spec) for spec in args.services]
    names = [service.name for service in services]
    if len(set(names)) != len(names):
        raise CliError(f"a service is listed twice: {', '.join(names)}", ExitCode.USAGE)
    url = getattr(args, "url", None)
    if args.takeover:
        os.environ[TAKEOVER_ENV] = "1"  # read by each service as it starts, workers too
    if args.workers > 1:
        return run_workers(
            args.services, args.workers, url=url, grace=args.grace, app_dir=args.app_dir
        )
    try:
        run_services(services, url, grace=args.grace)
    except* ConfigConflict as conflicts:  # e.g. a consumer another program owns
        raise CliError(str(_first(conflicts)), ExitCode.CONFIG_CONFLICT) from None
    return ExitCode.OK


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first error in a (nested) exception group: what a task group raised."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# --- call -----------------------------------------------------------------------------


def _refuse_event_subject(subject: str) -> None:
    """`events.>` is where events are stored, not where anything answers a request."""
    from ..transport.names import EVENT_PREFIX, check_event_type

    if subject != EVENT_PREFIX and not subject.startswith(EVENT_PREFIX + "."):
        return
    rest = subject[len(EVENT_PREFIX) + 1 :]
    event_type = "TYPE"
    for candidate in (rest, rest.rpartition(".")[0]):  # `events.<type>[.<key>]`
        try:
            event_type = check_event_type(candidate)
            break
        except InvalidName:
            continue
    raise CliError(
        f"{subject} is an event subject: events are published to a stream, not called "
        f"(nothing answers a request there); use `mesh publish {event_type} JSON`",
        ExitCode.USAGE,
    )


def cmd_call(args: argparse.Namespace) -> int:
    """Send one request and print the reply as JSON."""
    from ..transport.names import check_subject

    try:
        check_subject(args.subject)
    except InvalidName as error:
        raise CliError(str(error), ExitCode.USAGE) from None
    _refuse_event_subject(args.subject)
    payload = read_payload(args.payload)
    headers = parse_headers(args.header)

    async def body(client: Client) -> int:
        reply: Any = await client.call(
            args.subject, payload, timeout=args.timeout, headers=headers or None
        )
        print_json(reply)
        return ExitCode.OK

    return with_client(args, body)


# --- ls, info, stats ------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """One line per running service instance; a `!` column and a line per service whose
    instances advertise different versions or schemas (two programs under one name?)."""
    from ..rpc.discovery import PingResponse, divergences

    async def body(client: Client) -> int:
        infos = await client.info(timeout=discovery_timeout(args))
        if args.json:
            pings = [
                PingResponse(name=i.name, id=i.id, version=i.version, metadata=i.metadata)
                for i in infos
            ]
            print_json(pings)
        elif not infos:
            print("no services", file=sys.stderr)
        else:
            found = divergences(infos)
            flagged = {i for d in found for i in d.versions}
            rows: list[Sequence[str]] = [
                ("!" if i.id in flagged else "", i.name, i.id, i.version) for i in infos
            ]
            columns: Sequence[str] = ("!", "NAME", "ID", "VERSION")
            if not found:  # the flag column only when there is something to flag
                rows, columns = [row[1:] for row in rows], columns[1:]
            print(table(rows, columns))
            for divergence in found:
                print(f"! {divergence.describe()}")
        return ExitCode.OK

    return with_client(args, body)


def _none_found(name: str | None, timeout: float) -> int:
    if name is not None:
        raise CliError(
            f"no service named {name!r} answered within {timeout:g}s", ExitCode.NOT_FOUND
        )
    print("no services", file=sys.stderr)
    return ExitCode.OK


def _discovery(
    args: argparse.Namespace,
    verb: Callable[[Client], Callable[..., Awaitable[Sequence[Any]]]],
    render: Callable[[Sequence[Any]], str],
) -> int:
    """`info` and `stats`: ask every instance (of NAME), print JSON or a rendering."""
    check_service_name_arg(args.name)
    timeout = discovery_timeout(args)

    async def body(client: Client) -> int:
        responses = await verb(client)(args.name, timeout=timeout)
        if not responses:
            return _none_found(args.name, timeout)
        print_result(responses, args.json, render)
        return ExitCode.OK

    return with_client(args, body)


def cmd_info(args: argparse.Namespace) -> int:
    """Each instance's description and endpoints."""
    return _discovery(args, lambda client: client.info, _render_info)


def _render_info(responses: Sequence[Any]) -> str:
    blocks = []
    for r in responses:
        lines = [
            f"Service:     {r.name}",
            f"ID:          {r.id}",
            f"Version:     {r.version}",
            f"Description: {r.description or '-'}",
        ]
        if r.endpoints:
            rows = [
                (e.name, e.subject, e.queue_group, (e.metadata or {}).get("kind"))
                for e in r.endpoints
            ]
            endpoints = table(rows, ("NAME", "SUBJECT", "QUEUE", "KIND"))
            lines += ["Endpoints:", *("  " + line for line in endpoints.splitlines())]
        else:
            lines.append("Endpoints:   none")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def cmd_stats(args: argparse.Namespace) -> int:
    """Request, error and timing counts per endpoint of each instance."""
    return _discovery(args, lambda client: client.stats, _render_stats)


def _stats_row(r: Any, e: Any, extra: Sequence[tuple[str, str]]) -> list[object]:
    data = e.data or {}
    return [
        r.name,
        r.id,
        e.name,
        e.num_requests,
        e.num_errors,
        f"{e.average_processing_time / 1e6:.3f}",
        *(data.get(key) for key, _ in extra),
        one_line(e.last_error, LAST_ERROR_WIDTH) or None,
    ]


def _render_stats(responses: Sequence[Any]) -> str:
    present = {key for r in responses for e in r.endpoints for key in (e.data or {})}
    extra = [(key, title) for key, title in _SUBSCRIBER_STATS if key in present]
    headers = ["SERVICE", "ID", "ENDPOINT", "REQUESTS", "ERRORS", "AVG(ms)"]
    headers += [title for _, title in extra] + ["LAST ERROR"]
    rows: list[list[object]] = []
    for r in responses:
        if not r.endpoints:
            rows.append([r.name, r.id, None, None, None, None, *(None for _ in extra), None])
        rows += [_stats_row(r, e, extra) for e in r.endpoints]
    return table(rows, headers)


# --- parsers --------------------------------------------------------------------------


def _add_run(subparsers: Subparsers) -> None:
    run = add_command(
        subparsers,
        "run",
        "run services until SIGTERM/SIGINT, in this process or in N worker processes",
        codes=(ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE),
        notes={
            ExitCode.OK: "stopped by SIGTERM or SIGINT (every worker stopped)",
            ExitCode.USAGE: "bad arguments, a spec that does not load, a service listed twice",
            ExitCode.CONFIG_CONFLICT: "a service could not start: its consumer belongs to another "
            "program or its settings differ (see --takeover); workers are not restarted",
        },
        examples=(
            "mesh run services.orders:service services.payments:service",
            "mesh run services.orders:service --workers 2",
        ),
        handler=cmd_run,
    )
    run.add_argument("services", nargs="+", metavar="MODULE:ATTR", help="a framework.Service")
    run.add_argument(
        "--workers",
        type=workers,
        default=1,
        metavar="N|auto",
        help="processes of these services, supervised: a crashed one is restarted "
        f"(default: 1, in this process; auto: one per core, here {os.cpu_count() or 1})",
    )
    run.add_argument(
        "--grace",
        type=grace_seconds,
        default=10.0,
        metavar="SECONDS",
        help="time in-flight work gets to finish on shutdown (default: 10)",
    )
    run.add_argument(
        "--app-dir",
        default=".",
        metavar="DIR",
        help="directory put first on sys.path to import MODULE from (default: .)",
    )
    run.add_argument(
        "--takeover",
        action="store_true",
        help="take over these services' consumers even if another program or an older "
        f"version set them up ({TAKEOVER_ENV}=1; README: 'One service name, one program')",
    )
    add_connection_options(run)


def _add_call(subparsers: Subparsers) -> None:
    call = add_command(
        subparsers,
        "call",
        "send a request to an endpoint and print the reply as JSON",
        notes={
            ExitCode.USAGE: "bad arguments, invalid JSON payload or header, an event "
            "subject (events.>: use `mesh publish`)",
            ExitCode.NOT_FOUND: "no responders (503), unknown endpoint (404)",
        },
        examples=(
            'mesh call orders.create \'{"customer_id": "c-1", "items": '
            '[{"sku": "book-1", "quantity": 2, "unit_price_cents": 1999}]}\'',
            "mesh call orders.list '{\"limit\": 5}' --timeout 2",
            "echo '{\"limit\": 5}' | mesh call orders.list -",
        ),
        handler=cmd_call,
    )
    call.add_argument("subject", metavar="SUBJECT", help="e.g. orders.create")
    call.add_argument(
        "payload", nargs="?", metavar="JSON", help="request body, sent as given; - reads stdin"
    )
    call.add_argument(
        "--header", "-H", action="append", metavar="K=V", help="a request header (repeatable)"
    )
    add_connection_options(call, timeout_help=CALL_TIMEOUT_HELP)


def _add_discovery(subparsers: Subparsers) -> None:
    ls = add_command(
        subparsers,
        "ls",
        "list running service instances (! marks instances of one service that differ)",
        codes=(c for c in _DISCOVERY_CODES if c != ExitCode.NOT_FOUND),
        notes={ExitCode.OK: "(also when it finds no services)"},
        examples=("mesh ls", "mesh ls --json"),
        handler=cmd_ls,
    )
    not_found = {ExitCode.NOT_FOUND: "no service of the NAME given answered in time"}
    info = add_command(
        subparsers,
        "info",
        "describe services and their endpoints",
        codes=_DISCOVERY_CODES,
        notes=not_found,
        examples=("mesh info", "mesh info orders"),
        handler=cmd_info,
    )
    stats = add_command(
        subparsers,
        "stats",
        "request, error and timing counts per endpoint",
        codes=_DISCOVERY_CODES,
        notes=not_found,
        examples=("mesh stats", "mesh stats payments --json"),
        handler=cmd_stats,
    )
    for command in (info, stats):
        command.add_argument("name", nargs="?", metavar="NAME", help="only this service")
    for command in (ls, info, stats):
        command.add_argument("--json", action="store_true", help="print the raw responses")
        add_connection_options(command)


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    """Add `run`, `call`, `ls`, `info` and `stats` to `mesh`."""
    _add_run(subparsers)
    _add_call(subparsers)
    _add_discovery(subparsers)
    return {"run": cmd_run, "call": cmd_call, "ls": cmd_ls, "info": cmd_info, "stats": cmd_stats}
