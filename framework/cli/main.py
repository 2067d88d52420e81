"""`mesh`: the parser and the dispatch; the commands live in one module per family."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable, Mapping

from ..errors import ConnectionFailed, InvalidName, ServiceError
from ._common import (
    DISCOVERY_TIMEOUT,
    CliError,
    ExitCode,
    Handler,
    Subparsers,
    add_connection_options,
    epilog,
    exit_code_for,
    exit_codes_help,
)

__doc__ = f"""`mesh`: run, call and inspect services from the command line.

    mesh run MODULE:ATTR [MODULE:ATTR ...] [--workers N|auto] [--grace SECONDS]
    mesh call SUBJECT [JSON|-] [--timeout SECONDS] [--header K=V ...]
    mesh ls | info [NAME] | stats [NAME] [--json]
    mesh publish TYPE [JSON|-] ...;  mesh dlq ls | show ID | replay ID...|--all
    mesh jobs ls | show | enqueue [--wait] | cancel | retry | schedules | unschedule
    mesh up [--service MODULE:ATTR ...] [--detach];  mesh down
    mesh dashboard [--host HOST] [--port PORT];  mesh asyncapi [MODULE:ATTR ...] [-o FILE]

Every command takes `--url` (default: `NATS_URL`, else nats://127.0.0.1:4222) and
`--timeout`, before or after the command name.

Exit codes (a fixed table that scripts may rely on; `cli._common.EXIT_CODES`):

{exit_codes_help(indent=4)}

A `ServiceError` prints `error <code>: <message>` on stderr; every other failure prints
`mesh: <message>`; results go to stdout only.

Adding commands: a module `framework.cli.<family>` with
`register(subparsers) -> Mapping[str, Handler] | None`, named in `FAMILIES`. It adds its
subparsers (`_common.add_command`) and either returns handlers by command name or sets
them per (sub)parser (`handler=`), which wins. A handler takes the parsed
`argparse.Namespace`, returns an exit code and may raise `CliError` or `ServiceError`;
`_common` has what handlers share (client, output, argument types).
"""

__all__ = ["FAMILIES", "CliError", "ExitCode", "build_parser", "main"]

# The command families, each a module of this package with a `register(subparsers)`.
FAMILIES = ("services", "events", "jobs", "mesh", "replay", "web")

EXAMPLES = (
    "mesh run services.orders:service services.payments:service",
    "mesh call orders.list '{\"limit\": 5}'",
    "mesh --url nats://127.0.0.1:4222 stats payments",
)


def _register_families(subparsers: Subparsers, handlers: dict[str, Handler]) -> None:
    """Every family's commands; one that cannot be imported is reported and skipped."""
    for family in FAMILIES:
        module_name = f"{__package__}.{family}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            print(f"mesh: {family} commands unavailable: {error}", file=sys.stderr)
            continue
        register: Callable[[Subparsers], Mapping[str, Handler] | None] | None
        register = getattr(module, "register", None)
        if register is not None:
            handlers.update(register(subparsers) or {})


def _ensure_connection_options(subparsers: Subparsers) -> None:
    """`--url`/`--timeout` on every command, also one whose family did not add them."""
    for command in subparsers.choices.values():
        try:
            add_connection_options(command)
        except argparse.ArgumentError:
            pass  # the family declared its own


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The `mesh` parser and its handlers by command name."""
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="Run, call and inspect microservices on NATS.",
        epilog=epilog(examples=EXAMPLES),
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
    _register_families(subparsers, handlers)
    _ensure_connection_options(subparsers)
    return parser, handlers


def _exit_status(code: str | int | None) -> int:
    """argparse's SystemExit: None/0 after --help, 2 on a usage error."""
    if code is None:
        return ExitCode.OK
    return code if isinstance(code, int) else ExitCode.USAGE


def _run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command; every failure becomes its exit code and one line on stderr."""
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
    except ConnectionFailed as error:  # `mesh run`: the services' first connection
        print(f"mesh: {error}", file=sys.stderr)
        return ExitCode.NO_CONNECTION
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
    return _run(handler, args)
