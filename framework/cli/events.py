"""`mesh publish` and `mesh dlq ls|show|replay`: domain events from the command line.

    mesh publish TYPE [JSON|-] [--event-id ID] [--correlation-id ID] [-H K=V ...] [--json]
    mesh dlq ls [--service NAME] [--limit N] [--json]
    mesh dlq show ID [--json]
    mesh dlq replay ID [ID ...] | --all [--service NAME] [--json]

Registered by `framework.cli.main` (`register(subparsers)`). Exit codes are the one `mesh`
table; each command's `--help` says what a code means for it (e.g. `publish` exits 3 when
no stream captures the event type, `dlq replay` exits 1 when any replay failed, the others
still being replayed). `publish` waits `--timeout` seconds (default 5) for the JetStream
acknowledgement; each `dlq` operation may take `--timeout` seconds (default 10).
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
from ._common import (
    CliError,
    ExitCode,
    Handler,
    Subparsers,
    add_command,
    add_connection_options,
    check_service_name_arg,
    discovery_timeout,
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

_PUBLISH_CODES = (
    ExitCode.OK,
    ExitCode.FAILURE,
    ExitCode.USAGE,
    ExitCode.NOT_FOUND,
    ExitCode.NO_CONNECTION,
    ExitCode.INTERRUPTED,
)
_PUBLISH_NOTES = {
    ExitCode.OK: "stored, or a duplicate of an event already stored (same event id)",
    ExitCode.FAILURE: "JetStream did not store the event (no acknowledgement, permission, ...)",
    ExitCode.USAGE: "invalid event type, JSON payload, header or id",
    ExitCode.NOT_FOUND: "no stream captures the event type (declare a Stream, or start a "
    "service that subscribes to it)",
}
_PUBLISH_EXAMPLES = (
    "mesh publish order.created.v1 "
    '\'{"order_id": "o-1", "customer_id": "c-1", "total_cents": 500}\'',
    'echo \'{"order_id": "o-2", "customer_id": "c-1", "total_cents": 900}\' '
    "| mesh publish order.created.v1 - --event-id order-o-2",
)

_DLQ_CODES = (
    ExitCode.OK,
    ExitCode.FAILURE,
    ExitCode.USAGE,
    ExitCode.NOT_FOUND,
    ExitCode.TIMEOUT,
    ExitCode.NO_CONNECTION,
    ExitCode.INTERRUPTED,
)
_DLQ_NOTES = {
    ExitCode.OK: "(also: `dlq ls` that finds no dead letters; `dlq replay` that replayed all)",
    ExitCode.FAILURE: "an unexpected error; `dlq replay`: at least one replay failed",
    ExitCode.USAGE: "bad arguments",
    ExitCode.NOT_FOUND: "no dead letter with that ID (`show`, `replay`)",
    ExitCode.TIMEOUT: "JetStream did not answer in time",
}


# --- helpers -------------------------------------------------------------------------


def _dead_letter_id(text: str) -> int:
    try:
        return positive_int(text)
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


def _no_dead_letters(service: str | None) -> str:
    return f"no dead letters for service {service}" if service else "no dead letters"


# --- publish -------------------------------------------------------------------------


def _publish_headers(items: Sequence[str] | None) -> dict[str, str]:
    headers = parse_headers(items)
    for name in headers:
        why = _RESERVED_HEADERS.get(name.lower())
        if why is not None:
            raise CliError(f"header {name} is set by mesh publish: {why}", ExitCode.USAGE)
    return headers


def _print_ack(ack: Any, as_json: bool) -> None:
    if as_json:
        print_json(ack)
    elif ack.duplicate:
        print(
            f"duplicate of seq {ack.seq} in {ack.stream} event {ack.event_id} "
            f"(already stored, not stored again)"
        )
    else:
        print(f"stored in {ack.stream} seq {ack.seq} event {ack.event_id}")


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
    payload = read_payload(EMPTY_PAYLOAD if args.payload is None else args.payload)
    timeout = discovery_timeout(args, PUBLISH_TIMEOUT)

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
        _print_ack(ack, args.json)
        return ExitCode.OK

    return with_client(args, body)


# --- dlq -----------------------------------------------------------------------------

_DLQ_HEADERS = (
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


def _dlq_row(letter: DeadLetter, now: float) -> tuple[object, ...]:
    return (
        letter.id,
        letter.service,
        letter.handler,
        letter.reason,
        letter.attempts,
        letter.event_type,
        letter.event_id,
        _age(letter.time, now),
        one_line(letter.error, ERROR_WIDTH),
    )


def _dlq_table(letters: Sequence[DeadLetter]) -> str:
    now = time.time()
    return table([_dlq_row(letter, now) for letter in letters], _DLQ_HEADERS)


def cmd_dlq_ls(args: argparse.Namespace) -> int:
    """The dead letters, oldest first."""
    from ..events.deadletter import list_dead_letters

    check_service_name_arg(args.service)
    timeout = discovery_timeout(args, DLQ_TIMEOUT)

    async def body(client: Client) -> int:
        with anyio.fail_after(timeout):
            letters = await list_dead_letters(client, service=args.service, limit=args.limit)
        print_result(letters, args.json, _dlq_table, _no_dead_letters(args.service))
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

    timeout = discovery_timeout(args, DLQ_TIMEOUT)

    async def body(client: Client) -> int:
        try:
            with anyio.fail_after(timeout):
                letter = await get_dead_letter(client, args.id)
        except NotFound as error:
            raise CliError(f"{error.message} (see `mesh dlq ls`)", ExitCode.NOT_FOUND) from None
        print_result(letter, args.json, _describe)
        return ExitCode.OK

    return with_client(args, body)


class _Replayed(msgspec.Struct, omit_defaults=True):
    id: int
    replayed: bool
    subject: str | None = None
    stream: str | None = None
    seq: int | None = None
    error: str | None = None


async def _replay_one(
    client: Client, letter_id: int, known: DeadLetter | None, timeout: float, quiet: bool
) -> _Replayed:
    """Replay one dead letter; a failure is reported and counted, never raised."""
    from ..events.deadletter import get_dead_letter, replay_dead_letter

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
        if not quiet:
            print(f"replayed {letter_id} -> {letter.subject} seq {ack.seq}")
        return _Replayed(letter_id, True, letter.subject, ack.stream, ack.seq)
    print(f"mesh: {error}", file=sys.stderr)
    return _Replayed(letter_id, False, error=error)


async def _replay_todo(
    client: Client, args: argparse.Namespace, timeout: float
) -> list[tuple[int, DeadLetter | None]]:
    """The IDs given, or with --all a snapshot (letters that die again are not redone)."""
    from ..events.deadletter import list_dead_letters

    if not args.all:
        return [(letter_id, None) for letter_id in dict.fromkeys(args.ids)]
    with anyio.fail_after(timeout):
        letters = await list_dead_letters(client, service=args.service, limit=sys.maxsize)
    if not letters:
        print(_no_dead_letters(args.service), file=sys.stderr)
    return [(letter.id, letter) for letter in letters]


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Re-publish dead letters to their original subjects; each is removed once stored."""
    if args.all == bool(args.ids):
        raise CliError("give dead letter IDs or --all (not both)", ExitCode.USAGE)
    if args.service is not None and not args.all:
        raise CliError("--service goes with --all", ExitCode.USAGE)
    check_service_name_arg(args.service)
    timeout = discovery_timeout(args, DLQ_TIMEOUT)

    async def body(client: Client) -> int:
        todo = await _replay_todo(client, args, timeout)
        results = [
            await _replay_one(client, letter_id, known, timeout, args.json)
            for letter_id, known in todo
        ]
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
    """`mesh dlq` alone: argparse asks for the subcommand first; this is the fallback."""
    raise CliError("missing dlq command: ls, show or replay", ExitCode.USAGE)


# --- parsers -------------------------------------------------------------------------


def _add_publish(subparsers: Subparsers) -> None:
    publish = add_command(
        subparsers,
        "publish",
        "publish a domain event and wait for JetStream to store it",
        codes=_PUBLISH_CODES,
        notes=_PUBLISH_NOTES,
        examples=_PUBLISH_EXAMPLES,
        handler=cmd_publish,
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


def _dlq_command(
    subparsers: Subparsers, name: str, help_text: str, handler: Handler, *examples: str
) -> argparse.ArgumentParser:
    command = add_command(
        subparsers,
        name,
        help_text,
        codes=_DLQ_CODES,
        notes=_DLQ_NOTES,
        examples=examples,
        handler=handler,
    )
    add_connection_options(
        command,
        timeout_help=f"seconds each dead-letter operation may take (default: {DLQ_TIMEOUT:g})",
    )
    return command


def _add_dlq(subparsers: Subparsers) -> None:
    dlq = _dlq_command(
        subparsers,
        "dlq",
        "inspect and replay dead letters (events that could not be handled)",
        cmd_dlq,
    )
    commands = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)
    ls = _dlq_command(
        commands,
        "ls",
        "list dead letters, oldest first",
        cmd_dlq_ls,
        "mesh dlq ls",
        "mesh dlq ls --service payments --json",
    )
    ls.add_argument("--service", metavar="NAME", help="only this service's handlers")
    ls.add_argument(
        "--limit",
        type=positive_int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N dead letters (default: {DEFAULT_LIMIT})",
    )
    ls.add_argument("--json", action="store_true", help="print the dead letters as JSON")
    show = _dlq_command(
        commands,
        "show",
        "one dead letter with its headers and payload",
        cmd_dlq_show,
        "mesh dlq show 1",
    )
    show.add_argument("id", type=_dead_letter_id, metavar="ID", help="from `mesh dlq ls`")
    show.add_argument("--json", action="store_true", help="print the dead letter as JSON")
    _add_replay(commands)


def _add_replay(commands: Subparsers) -> None:
    replay = _dlq_command(
        commands,
        "replay",
        "re-publish dead letters to their original subjects (each is removed once stored)",
        cmd_dlq_replay,
        "mesh dlq replay 1",
        "mesh dlq replay --all --service payments",
    )
    replay.add_argument(
        "ids", nargs="*", type=_dead_letter_id, metavar="ID", help="from `mesh dlq ls`"
    )
    replay.add_argument("--all", action="store_true", help="every dead letter (see --service)")
    replay.add_argument("--service", metavar="NAME", help="with --all: only this service's")
    replay.add_argument("--json", action="store_true", help="print the results as JSON")


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    """Add `publish` and `dlq` to `mesh`."""
    _add_publish(subparsers)
    _add_dlq(subparsers)
    return {"publish": cmd_publish, "dlq": cmd_dlq}
