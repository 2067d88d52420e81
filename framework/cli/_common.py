"""What every `mesh` command family shares: exit codes, help, arguments, output, client.

The one exit-code table (`EXIT_CODES`) lives here; a command's help shows that table,
with what the command adds to a code's meaning (`add_command(..., notes=...)`) and its
examples. Command modules import from here and never from each other.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import anyio
import msgspec

from ..errors import BadRequest, InvalidName, ServiceError
from ..runner import CONFIG_EXIT
from ..transport.settings import DEFAULT_URL, split_urls

if TYPE_CHECKING:
    from ..client import Client
    from ..runner import Servable

__all__ = [
    "DISCOVERY_TIMEOUT",
    "EXIT_CODES",
    "CliError",
    "ExitCode",
    "Handler",
    "Subparsers",
    "add_command",
    "add_connection_options",
    "check_service_name_arg",
    "discovery_timeout",
    "epilog",
    "exit_code_for",
    "exit_codes_help",
    "grace_seconds",
    "in_range",
    "load_spec",
    "one_line",
    "open_client",
    "parse_headers",
    "port",
    "positive_int",
    "print_json",
    "print_result",
    "read_payload",
    "seconds",
    "table",
    "with_client",
]

Handler: TypeAlias = Callable[[argparse.Namespace], int]
"""A command: takes the parsed arguments, returns the exit code (or raises CliError)."""
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_N = TypeVar("_N", int, float)
_V = TypeVar("_V")

DISCOVERY_TIMEOUT = 0.5
CONNECT_DEADLINE = 10.0  # the whole connection attempt, over every server in the URL list


class ExitCode(IntEnum):
    """`mesh` exit codes, fixed for scripts (see `EXIT_CODES` for their meaning)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    BAD_REQUEST = 5
    SERVICE_ERROR = 6
    NO_CONNECTION = 7
    CONFIG_CONFLICT = CONFIG_EXIT
    INTERRUPTED = 130


# The one table: a short name and what the code means for every command.
EXIT_CODES: Mapping[ExitCode, tuple[str, str]] = {
    ExitCode.OK: ("ok", ""),
    ExitCode.FAILURE: ("failure", "an unexpected error, or an unreadable reply"),
    ExitCode.USAGE: (
        "usage",
        "bad arguments, invalid JSON payload or header, a spec that does not load",
    ),
    ExitCode.NOT_FOUND: (
        "not found",
        "no responders (503), unknown endpoint or resource (404), no service of the NAME given to `info` or `stats`",
    ),
    ExitCode.TIMEOUT: ("timeout", "no reply in time, deadline exceeded (408)"),
    ExitCode.BAD_REQUEST: ("bad request", "the service rejected the payload (400)"),
    ExitCode.SERVICE_ERROR: (
        "service error",
        "any other error code a service answered with (500, 422, ...)",
    ),
    ExitCode.NO_CONNECTION: ("no connection", "NATS could not be reached at the URL"),
    ExitCode.CONFIG_CONFLICT: (
        "config conflict",
        "a stream or consumer differs from, or belongs to another program than, the code "
        "(ConfigConflict); restarting cannot fix it",
    ),
    ExitCode.INTERRUPTED: ("interrupted", "(Ctrl-C)"),
}

HELP_WIDTH = 88


def exit_codes_help(
    notes: Mapping[ExitCode, str] | None = None,
    *,
    codes: Iterable[ExitCode] | None = None,
    indent: int = 2,
) -> str:
    """The exit-code table as text: `codes` (default: all), a command's `notes` in place
    of the general meaning, lines wrapped under their text."""
    notes = notes or {}
    lines = []
    for code in codes if codes is not None else EXIT_CODES:
        name, meaning = EXIT_CODES[code]
        text = notes.get(code, meaning)
        row = f"{name} {text}" if text.startswith("(") or not text else f"{name}: {text}"
        lines.append(
            textwrap.fill(
                row,
                HELP_WIDTH,
                initial_indent=" " * indent + f"{int(code):<4} ",
                subsequent_indent=" " * (indent + 5),
                break_on_hyphens=False,
            )
        )
    return "\n".join(lines)


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


# --- argument types and checks --------------------------------------------------------


def _parsed(text: str, kind: Callable[[str], _N], what: str) -> _N:
    """`kind(text)`, or the usage error argparse prints: `not <what>: '<text>'`."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def in_range(kind: Callable[[str], _N], what: str, low: _N, high: _N) -> Callable[[str], _N]:
    """An argparse type: `what`, parsed by `kind` (int or float), from `low` to `high`.

    Args:
        kind: parses the text (`int`, `float`).
        what: what the value is, for the error message (e.g. "a port number").
        low: the smallest value accepted.
        high: the largest value accepted.
    """

    def parse(text: str) -> _N:
        value = _parsed(text, kind, what)
        if not low <= value <= high:  # NaN is refused too
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}: {text!r}")
        return value

    return parse


port = in_range(int, "a port number", 1, 65535)
"""argparse type: a TCP port, 1-65535."""


def seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    value = _parsed(text, float, "a number of seconds")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def grace_seconds(text: str) -> float:
    """argparse type: zero or more (finite) seconds."""
    value = _parsed(text, float, "a number of seconds")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number, 1 or more."""
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an RFC 9110 token


def parse_headers(items: Sequence[str] | None) -> dict[str, str]:
    """`-H NAME=VALUE` options to a dict, each checked as the framework checks headers."""
    from ..transport.headers import check_header

    headers: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not _HEADER_NAME.match(name):
            raise CliError(f"invalid header {item!r}: expected NAME=VALUE", ExitCode.USAGE)
        try:
            headers[name] = check_header(name, value)
        except BadRequest as error:
            raise CliError(f"invalid header: {error.message}", ExitCode.USAGE) from None
    return headers


def read_payload(text: str | None) -> bytes:
    """The JSON argument (`-` reads stdin), checked to be JSON but sent exactly as given."""
    if text is None:
        return b""
    raw = sys.stdin.buffer.read() if text == "-" else text.encode()
    try:
        msgspec.json.decode(raw)
    except msgspec.DecodeError as error:
        raise CliError(f"invalid JSON payload: {error}", ExitCode.USAGE) from None
    return raw


def check_service_name_arg(name: str | None) -> None:
    """A service name given on the command line: a usage error if it is not a token."""
    from ..transport.names import check_token

    if name is not None:
        try:
            check_token(name, "service name")
        except InvalidName as error:
            raise CliError(str(error), ExitCode.USAGE) from None


def load_spec(spec: str) -> Servable:
    """`MODULE:ATTR` to its Service, or a usage error that says what is wrong."""
    import importlib

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


# --- output ---------------------------------------------------------------------------


def _cell(value: object) -> str:
    text = "" if value is None else " ".join(str(value).split())
    return text or "-"


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
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


def print_result(
    value: _V, as_json: bool, render: Callable[[_V], str], empty: str | None = None
) -> None:
    """How every command shows what it found: JSON with `--json`, else `render(value)`.

    Args:
        value: what the command found (a struct, a reply, a list of them).
        as_json: `--json` was given: `print_json(value)` and nothing else.
        render: the text for a person (a table, a description).
        empty: for a list, what to say on stderr when it is empty (stdout stays empty,
            for scripts); None renders an empty list like any other.
    """
    if as_json:
        print_json(value)
    elif empty is not None and not value:
        print(empty, file=sys.stderr)
    else:
        print(render(value))


def one_line(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- parsers --------------------------------------------------------------------------


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
        "--timeout", type=seconds, default=default, metavar="SECONDS", help=timeout_help
    )


def epilog(
    notes: Mapping[ExitCode, str] | None = None,
    codes: Iterable[ExitCode] | None = None,
    examples: Sequence[str] = (),
) -> str:
    """A command's help footer: its exit codes, then its examples (each one runs as is)."""
    text = "exit codes:\n" + exit_codes_help(notes, codes=codes)
    if examples:
        text += "\n\nexamples:\n" + "\n".join(f"  {example}" for example in examples)
    return text


def add_command(
    subparsers: Subparsers,
    name: str,
    help_text: str,
    *,
    notes: Mapping[ExitCode, str] | None = None,
    codes: Iterable[ExitCode] | None = None,
    examples: Sequence[str] = (),
    handler: Handler | None = None,
) -> argparse.ArgumentParser:
    """A (sub)command with the shared help layout; `handler` runs it when given."""
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog(notes, codes, examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


# --- connecting -----------------------------------------------------------------------


def discovery_timeout(args: argparse.Namespace, default: float = DISCOVERY_TIMEOUT) -> float:
    """`--timeout` when given, else `default`."""
    timeout: float | None = getattr(args, "timeout", None)
    return default if timeout is None else timeout


def _no_connection(url: str | None, errors: list[BaseException], error: Exception) -> CliError:
    cause = errors[-1] if errors else error
    reason = str(cause) or type(cause).__name__
    if isinstance(cause, TimeoutError) and not str(cause):
        reason = f"no answer within {CONNECT_DEADLINE:g}s"
    return CliError(
        f"cannot connect to NATS at {','.join(split_urls(url))}: {reason} "
        "(is nats-server running? set --url or NATS_URL)",
        ExitCode.NO_CONNECTION,
    )


@asynccontextmanager
async def open_client(url: str | None) -> AsyncIterator[Client]:
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
        raise _no_connection(url, errors, error) from None
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()


def with_client(args: argparse.Namespace, body: Callable[[Client], Awaitable[int]]) -> int:
    """Connect to `args.url`, run `body(client)` in a fresh asyncio loop, close."""

    async def run() -> int:
        async with open_client(getattr(args, "url", None)) as client:
            return await body(client)

    return anyio.run(run, backend="asyncio")
