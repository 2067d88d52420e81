"""`mesh publish` and `mesh dlq ls|show|replay`: domain events from the command line.

    mesh publish TYPE [JSON|-] [--event-id ID] [--correlation-id ID] [-H K=V ...] [--json]
    mesh dlq ls [--service NAME] [--limit N] [--json]
    mesh dlq show ID [--json]
    mesh dlq replay ID [ID ...] | --all [--service NAME] [--json]

Plugged into `mesh` by `framework.cli.main`, which imports this module and calls
`register(subparsers)`. Exit codes are the `mesh` table:

    publish      0 stored, or a duplicate of an event already stored (same event id);
                 1 JetStream did not store it (no acknowledgement, permission, ...);
                 2 invalid event type, JSON, header or id; 3 no stream captures the type
    dlq ls       0 also when there are no dead letters ("no dead letters" on stderr)
    dlq show     3 no dead letter with that ID
    dlq replay   0 every one replayed; 1 at least one replay failed (the others are still
                 replayed); else 3 when an ID does not exist (the others are still replayed)

Every command also takes `--url` and `--timeout` (for `publish`: seconds to wait for the
JetStream acknowledgement, default 5; for `dlq`: seconds each operation may take,
default 10), and exits 7 when NATS cannot be reached (`dlq`: 4 on a timeout; for
`publish` a missing acknowledgement is a publish failure, 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ..errors import BadRequest, InvalidName, NoStream, NotFound, PublishError
from .main import (
    CliError,
    ExitCode,
    Handler,
    _parse_headers,
    _read_payload,
    _table,
    add_connection_options,
    check_service_name_arg,
    print_json,
    with_client,
)

if TYPE_CHECKING:
    from ..client import Client
    from ..events.deadletter import DeadLetter

__all__ = ["cmd_dlq_ls", "cmd_dlq_replay", "cmd_dlq_show", "cmd_publish", "register"]

PUBLISH_TIMEOUT = 5.0
DLQ_TIMEOUT = 10.0
DEFAULT_LIMIT = 100
ERROR_WIDTH = 60
EMPTY_PAYLOAD = "{}"

# Set by `publish` itself; a -H for one of them would be silently overwritten.
_RESERVED_HEADERS = {
    "nats-msg-id": "use --event-id",
    "correlation-id": "use --correlation-id",
    "event-type": "it is the TYPE argument",
    "event-time": "it is the time of publishing",
    "producer": "it is set by mesh",
}

_PUBLISH_CODES = """\
exit codes:
  0    stored, or a duplicate of an event already stored (same event id)
  1    failure: JetStream did not store the event (no acknowledgement, permission, ...)
  2    usage: invalid event type, JSON payload, header or id
  3    not found: no stream captures the event type (declare a Stream, or start a
       service that subscribes to it)
  7    no connection: NATS could not be reached at the URL
  130  interrupted (Ctrl-C)

examples:
  mesh publish order.created.v1 '{"order_id": "o-1", "amount_cents": 500}'
  mesh publish order.created.v1 - --event-id order-o-1 < order.json
"""

_DLQ_CODES = """\
exit codes:
  0    ok (also: `dlq ls` that finds no dead letters; `dlq replay` that replayed all)
  1    failure: an unexpected error; `dlq replay`: at least one replay failed
  2    usage: bad arguments
  3    not found: no dead letter with that ID (`show`, `replay`)
  4    timeout: JetStream did not answer in time
  7    no connection: NATS could not be reached at the URL
  130  interrupted (Ctrl-C)
"""


# --- helpers -------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _dead_letter_id(text: str) -> int:
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"not a dead letter ID (a positive number, see `mesh dlq ls`): {text!r}"
        ) from None


def _check_id(option: str, value: str | None) -> str | None:
    from ..transport import headers as h

    if value is None:
        return None
    try:
        return h.check_id(option, value)
    except BadRequest:
        raise CliError(
            f"invalid {option} {value!r}: use 1-{h.MAX_ID} letters, digits or ._:@/+=-",
            ExitCode.USAGE,
        ) from None


def _timeout(args: argparse.Namespace, default: float) -> float:
    value: float | None = getattr(args, "timeout", None)
    return default if value is None else value


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _age(since: float, now: float | None = None) -> str:
    """How long ago, in the largest whole unit: 42s, 7m, 3h, 2d."""
    if since <= 0:
        return "-"
    seconds = max(0, int((time.time() if now is None else now) - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _timestamp(epoch: float) -> str:
    if epoch <= 0:
        return "-"
    when = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
    return f"{when.replace('+00:00', 'Z')} ({_age(epoch)} ago)"


def _payload_text(data: str) -> str:
    """Pretty JSON when the payload is JSON, else the text as stored."""
    if not data:
        return "(empty)"
    try:
        msgspec.json.decode(data.encode())
    except msgspec.DecodeError:
        return data
    return msgspec.json.format(data.encode(), indent=2).decode()


# --- publish -------------------------------------------------------------------------


def _publish_headers(items: Sequence[str] | None) -> dict[str, str]:
    headers = _parse_headers(items)
    for name in headers:
        why = _RESERVED_HEADERS.get(name.lower())
        if why is not None:
            raise CliError(f"header {name} is set by mesh publish: {why}", ExitCode.USAGE)
    return headers


def cmd_publish(args: argparse.Namespace) -> int:
    """Publish one event and wait for JetStream to store it."""
    from ..transport.names import check_event_type

    try:
        check_event_type(args.event_type)
    except InvalidName as error:
        raise CliError(str(error), ExitCode.USAGE) from None
    event_id = _check_id("--event-id", args.event_id)
    correlation_id = _check_id("--correlation-id", args.correlation_id)
    headers = _publish_headers(args.header)
    payload = _read_payload(EMPTY_PAYLOAD if args.payload is None else args.payload)
    timeout = _timeout(args, PUBLISH_TIMEOUT)

    async def body(client: Client) -> int:
        try:
            ack = await client.publish(
                args.event_type,
                payload,  # bytes: sent exactly as given
                event_id=event_id,
                headers=headers or None,
                correlation_id=correlation_id,
                timeout=timeout,
            )
        except PublishError as error:
            message = str(error)
            if isinstance(error, NoStream):
                raise CliError(message, ExitCode.NOT_FOUND) from None
            if event_id:
                message += f" (publishing again with --event-id {event_id} stores it once)"
            raise CliError(message, ExitCode.FAILURE) from None
        if args.json:
            print_json(ack)
        elif ack.duplicate:
            print(
                f"duplicate of seq {ack.seq} in {ack.stream} event {ack.event_id} "
                f"(already stored, not stored again)"
            )
        else:
            print(f"stored in {ack.stream} seq {ack.seq} event {ack.event_id}")
        return ExitCode.OK

    return with_client(args, body)


# --- dlq -----------------------------------------------------------------------------


def cmd_dlq_ls(args: argparse.Namespace) -> int:
    """The dead letters, oldest first."""
    from ..events.deadletter import list_dead_letters

    check_service_name_arg(args.service)
    timeout = _timeout(args, DLQ_TIMEOUT)

    async def body(client: Client) -> int:
        with anyio.fail_after(timeout):
            letters = await list_dead_letters(client, service=args.service, limit=args.limit)
        if args.json:
            print_json(letters)
        elif not letters:
            where = f" for service {args.service}" if args.service else ""
            print(f"no dead letters{where}", file=sys.stderr)
        else:
            now = time.time()
            rows = [
                (
                    letter.id,
                    letter.service,
                    letter.handler,
                    letter.reason,
                    letter.attempts,
                    letter.event_type,
                    letter.event_id,
                    _age(letter.time, now),
                    _one_line(letter.error, ERROR_WIDTH),
                )
                for letter in letters
            ]
            headers = (
                "ID",
                "SERVICE",
                "HANDLER",
                "REASON",
                "ATTEMPTS",
                "EVENT TYPE",
                "EVENT ID",
                "AGE",
                "ERROR",
            )
            print(_table(rows, headers))
        return ExitCode.OK

    return with_client(args, body)


def _describe(letter: DeadLetter) -> str:
    lines = [
        f"ID:          {letter.id}",
        f"Service:     {letter.service or '-'}",
        f"Handler:     {letter.handler or '-'}",
        f"Reason:      {letter.reason or '-'}",
        f"Error:       {letter.error or '-'}",
        f"Attempts:    {letter.attempts}",
        f"Event type:  {letter.event_type or '-'}",
        f"Event ID:    {letter.event_id or '-'}",
        f"Subject:     {letter.subject or '-'}",
        f"Stream:      {letter.stream or '-'} seq {letter.sequence}",
        f"Dead since:  {_timestamp(letter.time)}",
    ]
    if letter.headers:
        lines.append("Headers:")
        width = max(len(name) for name in letter.headers)
        lines += [
            f"  {name + ':':<{width + 1}} {value}" for name, value in sorted(letter.headers.items())
        ]
    else:
        lines.append("Headers:     none")
    lines.append("Payload:")
    lines.append(_payload_text(letter.data))
    return "\n".join(lines)


def cmd_dlq_show(args: argparse.Namespace) -> int:
    """One dead letter: why, where from, the original headers and payload."""
    from ..events.deadletter import get_dead_letter

    timeout = _timeout(args, DLQ_TIMEOUT)

    async def body(client: Client) -> int:
        try:
            with anyio.fail_after(timeout):
                letter = await get_dead_letter(client, args.id)
        except NotFound as error:
            raise CliError(f"{error.message} (see `mesh dlq ls`)", ExitCode.NOT_FOUND) from None
        if args.json:
            print_json(letter)
        else:
            print(_describe(letter))
        return ExitCode.OK

    return with_client(args, body)


class _Replayed(msgspec.Struct, omit_defaults=True):
    id: int
    replayed: bool
    subject: str | None = None
    stream: str | None = None
    seq: int | None = None
    error: str | None = None


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Re-publish dead letters to their original subjects; each is removed once stored."""
    from ..events.deadletter import get_dead_letter, list_dead_letters, replay_dead_letter

    if args.all == bool(args.ids):
        raise CliError("give dead letter IDs or --all (not both)", ExitCode.USAGE)
    if args.service is not None and not args.all:
        raise CliError("--service goes with --all", ExitCode.USAGE)
    check_service_name_arg(args.service)
    timeout = _timeout(args, DLQ_TIMEOUT)

    async def replay_one(client: Client, letter_id: int, known: Any) -> _Replayed:
        try:
            with anyio.fail_after(timeout):
                letter = known or await get_dead_letter(client, letter_id)
                ack = await replay_dead_letter(client, letter_id)
        except NotFound:
            print(f"mesh: no dead letter {letter_id}", file=sys.stderr)
            return _Replayed(letter_id, False, error="not found")
        except TimeoutError:
            error = f"replay of dead letter {letter_id} timed out after {timeout:g}s"
        except PublishError as exc:
            error = str(exc)
        except Exception as exc:  # keep going with the rest; reported and counted
            error = f"replay of dead letter {letter_id} failed: {type(exc).__name__}: {exc}"
        else:
            if not args.json:
                print(f"replayed {letter_id} -> {letter.subject} seq {ack.seq}")
            return _Replayed(letter_id, True, letter.subject, ack.stream, ack.seq)
        print(f"mesh: {error}", file=sys.stderr)
        return _Replayed(letter_id, False, error=error)

    async def body(client: Client) -> int:
        todo: list[tuple[int, Any]]
        if args.all:
            # A snapshot: letters that die again during the replay are not replayed twice.
            with anyio.fail_after(timeout):
                letters = await list_dead_letters(client, service=args.service, limit=sys.maxsize)
            if not letters:
                where = f" for service {args.service}" if args.service else ""
                print(f"no dead letters{where}", file=sys.stderr)
            todo = [(letter.id, letter) for letter in letters]
        else:
            todo = [(letter_id, None) for letter_id in dict.fromkeys(args.ids)]
        results = [await replay_one(client, letter_id, known) for letter_id, known in todo]
        if args.json:
            print_json(results)
        return _replay_exit_code(results)

    return with_client(args, body)


def _replay_exit_code(results: Sequence[_Replayed]) -> int:
    failed = [r for r in results if not r.replayed]
    if any(r.error != "not found" for r in failed):
        return ExitCode.FAILURE
    if failed:
        return ExitCode.NOT_FOUND
    return ExitCode.OK


def cmd_dlq(args: argparse.Namespace) -> int:
    raise CliError("missing dlq command: ls, show or replay", ExitCode.USAGE)


# --- parser --------------------------------------------------------------------------


def _parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    epilog: str,
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _dlq_options(parser: argparse.ArgumentParser) -> None:
    add_connection_options(
        parser,
        timeout_help=f"seconds each dead-letter operation may take (default: {DLQ_TIMEOUT:g})",
    )


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Mapping[str, Handler]:
    """Add `publish` and `dlq` to `mesh`."""
    publish = _parser(
        subparsers,
        "publish",
        "publish a domain event and wait for JetStream to store it",
        _PUBLISH_CODES,
    )
    publish.add_argument("event_type", metavar="TYPE", help="event type, e.g. order.created.v1")
    publish.add_argument(
        "payload",
        nargs="?",
        metavar="JSON",
        help=f"the event, sent exactly as given; - reads stdin (default: {EMPTY_PAYLOAD})",
    )
    publish.add_argument(
        "--event-id",
        metavar="ID",
        help="the event id (Nats-Msg-Id): the stream stores the same id once (default: a new one)",
    )
    publish.add_argument(
        "--correlation-id", metavar="ID", help="correlation id (default: the event id)"
    )
    publish.add_argument(
        "--header", "-H", action="append", metavar="K=V", help="an event header (repeatable)"
    )
    publish.add_argument("--json", action="store_true", help="print the acknowledgement as JSON")
    add_connection_options(
        publish,
        timeout_help="seconds to wait for the JetStream acknowledgement "
        f"(default: {PUBLISH_TIMEOUT:g})",
    )
    publish.set_defaults(handler=cmd_publish)

    dlq = _parser(
        subparsers,
        "dlq",
        "inspect and replay dead letters (events that could not be handled)",
        _DLQ_CODES,
    )
    _dlq_options(dlq)
    commands = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)

    ls = _parser(commands, "ls", "list dead letters, oldest first", _DLQ_CODES)
    ls.add_argument("--service", metavar="NAME", help="only this service's handlers")
    ls.add_argument(
        "--limit",
        type=_positive_int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N dead letters (default: {DEFAULT_LIMIT})",
    )
    ls.add_argument("--json", action="store_true", help="print the dead letters as JSON")
    ls.set_defaults(handler=cmd_dlq_ls)

    show = _parser(commands, "show", "one dead letter with its headers and payload", _DLQ_CODES)
    show.add_argument("id", type=_dead_letter_id, metavar="ID", help="from `mesh dlq ls`")
    show.add_argument("--json", action="store_true", help="print the dead letter as JSON")
    show.set_defaults(handler=cmd_dlq_show)

    replay = _parser(
        commands,
        "replay",
        "re-publish dead letters to their original subjects (each is removed once stored)",
        _DLQ_CODES,
    )
    replay.add_argument(
        "ids", nargs="*", type=_dead_letter_id, metavar="ID", help="from `mesh dlq ls`"
    )
    replay.add_argument("--all", action="store_true", help="every dead letter (see --service)")
    replay.add_argument("--service", metavar="NAME", help="with --all: only this service's")
    replay.add_argument("--json", action="store_true", help="print the results as JSON")
    replay.set_defaults(handler=cmd_dlq_replay)

    for command in (ls, show, replay):
        _dlq_options(command)
    return {"publish": cmd_publish, "dlq": cmd_dlq}
