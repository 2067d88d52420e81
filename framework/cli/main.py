"""`mesh`: run, call and inspect services from the command line.

    mesh run MODULE:ATTR [MODULE:ATTR ...] [--grace SECONDS] [--app-dir DIR]
    mesh call SUBJECT [JSON|-] [--timeout SECONDS] [--header K=V ...]
    mesh ls [--json]
    mesh info [NAME] [--json]
    mesh stats [NAME] [--json]

Every command takes `--url` (default: `NATS_URL`, else nats://127.0.0.1:4222) and
`--timeout`, before or after the command name. For discovery `--timeout` is how long to
collect answers (default 0.5 s); for `call` it is the request's deadline (default 5 s).

Exit codes (a fixed table that scripts may rely on):

    0    ok (also: `mesh ls` that finds no services)
    1    failure: an unexpected error, or an unreadable reply
    2    usage: bad arguments, invalid JSON payload or header, a spec that does not load
    3    not found: no responders (503), unknown endpoint or resource (404),
         no service of the NAME given to `info` or `stats`
    4    timeout: no reply in time, deadline exceeded (408)
    5    bad request: the service rejected the payload (400)
    6    service error: any other error code a service answered with (500, 422, ...)
    7    no connection: NATS could not be reached at the URL
    130  interrupted (Ctrl-C)

A `ServiceError` prints `error <code>: <message>` on stderr; every other failure prints
`mesh: <message>`; results go to stdout only.

Extending: `build_parser()` returns the parser and a dict of handlers by command name.
A module `framework.cli.events` (optional, imported when present) may define
`register(subparsers) -> Mapping[str, Handler] | None`; it adds its subparsers there and
either returns handlers for its top-level commands or sets them per (sub)parser with
`set_defaults(handler=...)`, which wins. A handler takes the parsed `argparse.Namespace`
and returns an exit code; it may raise `CliError` or `ServiceError`. `with_client`,
`discovery_timeout`, `print_json` and `_table` are there for such handlers to reuse.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import msgspec

from ..errors import BadRequest, InvalidName, ServiceError
from ..transport.settings import DEFAULT_URL, split_urls

if TYPE_CHECKING:
    from ..client import Client
    from ..service import Service

__all__ = [
    "CliError",
    "ExitCode",
    "Handler",
    "add_connection_options",
    "build_parser",
    "discovery_timeout",
    "exit_code_for",
    "main",
    "print_json",
    "with_client",
]

Handler: TypeAlias = Callable[[argparse.Namespace], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

DISCOVERY_TIMEOUT = 0.5
CONNECT_DEADLINE = 10.0  # the whole connection attempt, over every server in the URL list
LAST_ERROR_WIDTH = 60


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    BAD_REQUEST = 5
    SERVICE_ERROR = 6
    NO_CONNECTION = 7
    INTERRUPTED = 130


_EXIT_CODE_HELP: tuple[tuple[ExitCode, str], ...] = (
    (ExitCode.OK, "ok (also: `mesh ls` that finds no services)"),
    (ExitCode.FAILURE, "failure: an unexpected error, or an unreadable reply"),
    (ExitCode.USAGE, "usage: bad arguments, invalid JSON or header, a spec that does not load"),
    (ExitCode.NOT_FOUND, "not found: no responders (503), unknown endpoint (404), no such NAME"),
    (ExitCode.TIMEOUT, "timeout: no reply in time, deadline exceeded (408)"),
    (ExitCode.BAD_REQUEST, "bad request: the service rejected the payload (400)"),
    (ExitCode.SERVICE_ERROR, "service error: any other code a service answered with"),
    (ExitCode.NO_CONNECTION, "no connection: NATS could not be reached at the URL"),
    (ExitCode.INTERRUPTED, "interrupted (Ctrl-C)"),
)

_EXIT_CODES = "exit codes:\n" + "\n".join(
    f"  {int(code):<4} {text}" for code, text in _EXIT_CODE_HELP
)
_EPILOG = (
    _EXIT_CODES + "\n\nexamples:\n"
    "  mesh run services.payments:service services.orders:service\n"
    '  mesh call payments.charge \'{"order_id": "o-1", "amount_cents": 500}\'\n'
    "  mesh --url nats://10.0.0.5:4222 stats payments\n"
)


class CliError(Exception):
    """Stop the command: print `mesh: <message>` on stderr and exit with `code`."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def exit_code_for(error: ServiceError) -> ExitCode:
    """One exit code per class of remote error, keyed by its ADR-32 code."""
    if error.code in (404, 503):
        return ExitCode.NOT_FOUND
    if error.code == 408:
        return ExitCode.TIMEOUT
    if error.code == 400:
        return ExitCode.BAD_REQUEST
    return ExitCode.SERVICE_ERROR


# --- argument types ------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an RFC 9110 token


def _parse_headers(items: Sequence[str] | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not _HEADER_NAME.match(name):
            raise CliError(f"invalid header {item!r}: expected NAME=VALUE", ExitCode.USAGE)
        try:
            from ..transport.headers import check_header

            headers[name] = check_header(name, value)
        except BadRequest as error:
            raise CliError(f"invalid header: {error.message}", ExitCode.USAGE) from None
    return headers


def _read_payload(text: str | None) -> bytes:
    """The JSON argument (`-` reads stdin), checked to be JSON but sent exactly as given."""
    if text is None:
        return b""
    raw = sys.stdin.buffer.read() if text == "-" else text.encode()
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as error:
        raise CliError(f"invalid JSON payload: {error}", ExitCode.USAGE) from None
    return raw


# --- output --------------------------------------------------------------------------


def _cell(value: object) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return text or "-"


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Plain columns aligned with two spaces; `None` and empty cells show as `-`."""
    cells = [list(headers), *([_cell(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def print_json(value: Any) -> None:
    """Pretty JSON on stdout: replies, msgspec structs, lists of them."""
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- connecting ----------------------------------------------------------------------


def _url_text(url: str | None) -> str:
    return ",".join(split_urls(url))


def discovery_timeout(args: argparse.Namespace) -> float:
    timeout: float | None = getattr(args, "timeout", None)
    return DISCOVERY_TIMEOUT if timeout is None else timeout


@asynccontextmanager
async def _open_client(url: str | None) -> AsyncIterator[Client]:
    """A client that fails fast: each server tried twice, nothing logged, then exit 7."""
    from ..client import Client

    errors: list[BaseException] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    async def quiet() -> None:
        return None

    try:
        with anyio.fail_after(CONNECT_DEADLINE):
            client = await Client.open(
                url,
                name="mesh-cli",
                max_reconnect_attempts=1,
                error_cb=on_error,
                disconnected_cb=quiet,
                reconnected_cb=quiet,
                closed_cb=quiet,
            )
    except Exception as error:
        cause = errors[-1] if errors else error
        reason = str(cause) or type(cause).__name__
        if isinstance(cause, TimeoutError) and not str(cause):
            reason = f"no answer within {CONNECT_DEADLINE:g}s"
        raise CliError(
            f"cannot connect to NATS at {_url_text(url)}: {reason} "
            "(is nats-server running? set --url or NATS_URL)",
            ExitCode.NO_CONNECTION,
        ) from None
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()


def with_client(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    """Connect to `args.url`, run `body(client)` in a fresh asyncio loop, close."""

    async def run() -> int:
        async with _open_client(getattr(args, "url", None)) as client:
            return await body(client)

    return anyio.run(run, backend="asyncio")


# --- commands ------------------------------------------------------------------------


def _load(spec: str) -> Service:
    from ..runner import load_service

    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise CliError(f"invalid service spec {spec!r}: expected MODULE:ATTR", ExitCode.USAGE)
    try:
        module = importlib.import_module(module_name)
        if not hasattr(module, attr or "service"):
            raise CliError(
                f"cannot load {spec!r}: module {module_name!r} has no attribute "
                f"{attr or 'service'!r}",
                ExitCode.USAGE,
            )
        return load_service(spec)
    except (ImportError, ValueError) as error:
        raise CliError(f"cannot load {spec!r}: {error}", ExitCode.USAGE) from None


def cmd_run(args: argparse.Namespace) -> int:
    from ..runner import run_services

    if args.app_dir:
        sys.path.insert(0, os.path.abspath(args.app_dir))
    services = [_load(spec) for spec in args.services]
    names = [service.name for service in services]
    if len(set(names)) != len(names):
        raise CliError(f"a service is listed twice: {', '.join(names)}", ExitCode.USAGE)
    run_services(services, args.url, grace=args.grace)
    return ExitCode.OK


def cmd_call(args: argparse.Namespace) -> int:
    from ..transport.names import check_subject

    try:
        check_subject(args.subject)
    except InvalidName as error:
        raise CliError(str(error), ExitCode.USAGE) from None
    payload = _read_payload(args.payload)
    headers = _parse_headers(args.header)

    async def body(client: Client) -> int:
        reply: Any = await client.call(
            args.subject, payload, timeout=args.timeout, headers=headers or None
        )
        print_json(reply)
        return ExitCode.OK

    return with_client(args, body)


def cmd_ls(args: argparse.Namespace) -> int:
    async def body(client: Client) -> int:
        responses = await client.ping(timeout=discovery_timeout(args))
        if args.json:
            print_json(responses)
        elif not responses:
            print("no services", file=sys.stderr)
        else:
            rows = [(r.name, r.id, r.version) for r in responses]
            print(_table(rows, ("NAME", "ID", "VERSION")))
        return ExitCode.OK

    return with_client(args, body)


def check_service_name_arg(name: str | None) -> None:
    """A service name given on the command line: a usage error if it is not a token."""
    from ..transport.names import check_token

    if name is not None:
        try:
            check_token(name, "service name")
        except InvalidName as error:
            raise CliError(str(error), ExitCode.USAGE) from None


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
        if args.json:
            print_json(responses)
        else:
            print(render(responses))
        return ExitCode.OK

    return with_client(args, body)


def cmd_info(args: argparse.Namespace) -> int:
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
            endpoints = _table(rows, ("NAME", "SUBJECT", "QUEUE", "KIND"))
            lines += ["Endpoints:", *("  " + line for line in endpoints.splitlines())]
        else:
            lines.append("Endpoints:   none")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# What a subscriber adds to its endpoint stats `data` (consumer lag and failures).
_SUBSCRIBER_STATS = (
    ("pending", "PENDING"),
    ("redelivered", "REDELIVERED"),
    ("dead_lettered", "DEAD-LETTERED"),
)


def cmd_stats(args: argparse.Namespace) -> int:
    return _discovery(args, lambda client: client.stats, _render_stats)


def _render_stats(responses: Sequence[Any]) -> str:
    present = {key for r in responses for e in r.endpoints for key in (e.data or {})}
    extra = [(key, title) for key, title in _SUBSCRIBER_STATS if key in present]
    headers = ["SERVICE", "ID", "ENDPOINT", "REQUESTS", "ERRORS", "AVG(ms)"]
    headers += [title for _, title in extra] + ["LAST ERROR"]
    rows: list[list[object]] = []
    for r in responses:
        if not r.endpoints:
            rows.append([r.name, r.id, None, None, None, None, *(None for _ in extra), None])
        for e in r.endpoints:
            data = e.data or {}
            rows.append(
                [
                    r.name,
                    r.id,
                    e.name,
                    e.num_requests,
                    e.num_errors,
                    f"{e.average_processing_time / 1e6:.3f}",
                    *(data.get(key) for key, _ in extra),
                    _truncate(e.last_error, LAST_ERROR_WIDTH) or None,
                ]
            )
    return _table(rows, headers)


# --- parser --------------------------------------------------------------------------


def add_connection_options(
    parser: argparse.ArgumentParser,
    *,
    timeout_help: str = f"seconds to collect answers (default: {DISCOVERY_TIMEOUT:g})",
    top_level: bool = False,
) -> None:
    """`--url` and `--timeout`, accepted before and after the command name.

    On subcommands the defaults are suppressed, so a value given before the command is
    not overwritten by the subcommand's default.
    """
    default = None if top_level else argparse.SUPPRESS
    parser.add_argument(
        "--url",
        default=default,
        metavar="URL",
        help=f"NATS server URL(s), comma separated (default: $NATS_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=default, metavar="SECONDS", help=timeout_help
    )


def _subparser(subparsers: Subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


_EXTENSIONS = ("events", "mesh", "replay")


def _register_extensions(subparsers: Subparsers, handlers: dict[str, Handler]) -> None:
    """Commands that live elsewhere: `publish`, `dlq ...` (cli.events), `up|down|demo` (cli.mesh)."""
    for extension in _EXTENSIONS:
        module_name = f"{__package__}.{extension}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                print(f"mesh: {extension} commands unavailable: {error}", file=sys.stderr)
            continue
        except ImportError as error:
            print(f"mesh: {extension} commands unavailable: {error}", file=sys.stderr)
            continue
        register: Callable[[Subparsers], Mapping[str, Handler] | None] | None
        register = getattr(module, "register", None)
        if register is not None:
            handlers.update(register(subparsers) or {})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The `mesh` parser and its handlers by command name: the place to add commands."""
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="Run, call and inspect microservices on NATS.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_options(
        parser,
        top_level=True,
        timeout_help=f"seconds to wait for answers (discovery default: {DISCOVERY_TIMEOUT:g}, "
        "call default: 5)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    handlers: dict[str, Handler] = {}

    run = _subparser(subparsers, "run", "run services in this process until SIGTERM/SIGINT")
    run.add_argument("services", nargs="+", metavar="MODULE:ATTR", help="a framework.Service")
    run.add_argument(
        "--grace",
        type=_grace,
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
    handlers["run"] = cmd_run

    call = _subparser(subparsers, "call", "send a request and print the reply as JSON")
    call.add_argument("subject", metavar="SUBJECT", help="e.g. payments.charge")
    call.add_argument(
        "payload", nargs="?", metavar="JSON", help="request body, sent as given; - reads stdin"
    )
    call.add_argument(
        "--header",
        "-H",
        action="append",
        metavar="K=V",
        help="a request header (repeatable)",
    )
    handlers["call"] = cmd_call

    ls = _subparser(subparsers, "ls", "list running service instances (NAME, ID, VERSION)")
    handlers["ls"] = cmd_ls

    info = _subparser(subparsers, "info", "describe services and their endpoints")
    info.add_argument("name", nargs="?", metavar="NAME", help="only this service")
    handlers["info"] = cmd_info

    stats = _subparser(subparsers, "stats", "request, error and timing counts per endpoint")
    stats.add_argument("name", nargs="?", metavar="NAME", help="only this service")
    handlers["stats"] = cmd_stats

    for command in (ls, info, stats):
        command.add_argument("--json", action="store_true", help="print the raw responses")
    add_connection_options(
        call, timeout_help="seconds to wait for the reply, sent as the deadline (default: 5)"
    )
    for command in (run, ls, info, stats):
        add_connection_options(command)

    _register_extensions(subparsers, handlers)
    for name, command in subparsers.choices.items():
        if name not in ("run", "call", "ls", "info", "stats"):
            try:
                add_connection_options(command)
            except argparse.ArgumentError:
                pass  # the extension declared its own
    return parser, handlers


# --- entry point ---------------------------------------------------------------------


def _exit_status(code: str | int | None) -> int:
    """argparse's SystemExit: None/0 after --help, 2 on a usage error."""
    if code is None:
        return ExitCode.OK
    return code if isinstance(code, int) else ExitCode.USAGE


def main(argv: list[str] | None = None) -> int:
    """Run `mesh` with `argv` (default: the command line) and return the exit code."""
    parser, handlers = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        return _exit_status(done.code)
    handler: Handler | None = getattr(args, "handler", None) or handlers.get(args.command)
    if handler is None:
        parser.print_usage(sys.stderr)
        return ExitCode.USAGE
    try:
        return int(handler(args))
    except CliError as error:
        print(f"mesh: {error.message}", file=sys.stderr)
        return error.code
    except ServiceError as error:
        print(f"error {error.code}: {error.message}", file=sys.stderr)
        return exit_code_for(error)
    except InvalidName as error:
        print(f"mesh: {error}", file=sys.stderr)
        return ExitCode.USAGE
    except TimeoutError as error:
        print(f"mesh: timed out: {error or 'no answer in time'}", file=sys.stderr)
        return ExitCode.TIMEOUT
    except KeyboardInterrupt:
        print("mesh: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # `mesh ls | head`: the reader left; send the rest nowhere instead of a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.FAILURE
    except Exception as error:
        traceback.print_exc()
        print(f"mesh: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return ExitCode.FAILURE
