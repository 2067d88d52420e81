"""`mesh dashboard` and `mesh asyncapi`: the mesh in a browser, and its catalog.

    mesh dashboard [--host HOST] [--port PORT] [--interval SECONDS] [--trace-file PATH]
    mesh asyncapi [MODULE:ATTR ...] [-o FILE] [--title TEXT]

`dashboard` serves on 127.0.0.1 unless told otherwise (it can replay and discard dead
letters and cancel jobs: whoever reaches it can). `asyncapi` describes the running
services, or the services named as MODULE:ATTR without any server. Both need the
`web` extra: `pip install "natsmesh-framework[web]"`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import (
    CliError,
    ExitCode,
    Handler,
    Subparsers,
    add_command,
    add_connection_options,
    discovery_timeout,
    in_range,
    load_spec,
    port,
    with_client,
)

if TYPE_CHECKING:
    from ..client import Client
    from ..service import Service

__all__ = ["cmd_asyncapi", "cmd_dashboard", "register"]

DEFAULT_PORT = 8484
_MISSING_EXTRA = 'needs the web extra: pip install "natsmesh-framework[web]"'


_interval = in_range(float, "a number of seconds", 0.1, 60)


def _start_line(host: str, port: int) -> str:
    from ..web.dashboard.app import LOOPBACK_HOSTS

    where = f"http://{host}:{port}/"
    if host in LOOPBACK_HOSTS:
        return f"mesh dashboard: {where} (bound to {host}: this machine only; --host to share)"
    return (
        f"mesh dashboard: {where} (bound to {host}: reachable from the network, and it can "
        "replay and discard dead letters and cancel jobs)"
    )


async def _reachable(client: Client) -> int:
    return ExitCode.OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the dashboard until Ctrl-C."""
    try:
        import uvicorn

        from ..web.dashboard import create_app
        from ..web.dashboard.traces import default_trace_file
    except ImportError as error:
        raise CliError(f"mesh dashboard {_MISSING_EXTRA} ({error})", ExitCode.USAGE) from None
    with_client(args, _reachable)  # the CLI's fail-fast connect: exit 7 with the reason
    trace_file = Path(args.trace_file) if args.trace_file else default_trace_file()
    connect_timeout = getattr(args, "timeout", None) or 10.0
    app = create_app(
        getattr(args, "url", None),
        interval=args.interval,
        trace_file=trace_file,
        host=args.host,
        connect_timeout=connect_timeout,
    )
    print(_start_line(args.host, args.port), flush=True)
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except SystemExit as exit_:  # uvicorn exits 3 when the lifespan fails (no NATS)
        raise CliError(
            f"the dashboard could not start (is NATS at {getattr(args, 'url', None) or 'NATS_URL'} "
            "reachable?)",
            ExitCode.NO_CONNECTION,
        ) from exit_
    finally:
        signal.signal(signal.SIGTERM, previous)
    return ExitCode.OK


def _stopped(signum: int, frame: object) -> None:
    """uvicorn shuts down gracefully on SIGTERM, then raises the signal again: ended here
    as after Ctrl-C (which uvicorn.run absorbs), so a stopped dashboard exits 0 as
    `mesh run` does, instead of dying of the signal."""
    raise KeyboardInterrupt


def _write(document: dict[str, Any], output: str | None) -> None:
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    if output is None or output == "-":
        sys.stdout.write(text)
        return
    path = Path(output)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise CliError(
                "YAML output needs pyyaml; write .json instead", ExitCode.USAGE
            ) from None
        text = yaml.safe_dump(document, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(document['operations'])} operations)", file=sys.stderr)


def _service(spec: str) -> Service:
    from ..service import Service

    loaded = load_spec(spec)
    if not isinstance(loaded, Service):
        raise CliError(f"{spec} is not a framework.Service: nothing to describe", ExitCode.USAGE)
    return loaded


def cmd_asyncapi(args: argparse.Namespace) -> int:
    """Write the AsyncAPI 3.0 document of running services, or of MODULE:ATTR ones."""
    from ..web.asyncapi import asyncapi_document, describe_services

    if args.services:
        infos = describe_services(_service(spec) for spec in args.services)
        _write(asyncapi_document(infos, title=args.title), args.output)
        return ExitCode.OK

    async def body(client: Client) -> int:
        infos = await client.info(timeout=discovery_timeout(args))
        if not infos:
            raise CliError(
                "no services answered $SRV.INFO (give MODULE:ATTR to describe code)",
                ExitCode.NOT_FOUND,
            )
        server = client.nc.connected_url.netloc if client.nc.connected_url else None
        _write(asyncapi_document(infos, title=args.title, server=server), args.output)
        return ExitCode.OK

    return with_client(args, body)


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    """Add `dashboard` and `asyncapi` to `mesh`."""
    dashboard = add_command(
        subparsers, "dashboard", "serve a live dashboard of the mesh (web extra)"
    )
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1, this machine only)",
    )
    dashboard.add_argument(
        "--port", type=port, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})"
    )
    dashboard.add_argument(
        "--interval",
        type=_interval,
        default=1.0,
        metavar="SECONDS",
        help="seconds between samples of the mesh (default: 1)",
    )
    dashboard.add_argument(
        "--trace-file",
        metavar="PATH",
        help="spans file to show traces from (default: $MESH_TRACE_FILE, else .mesh/traces.jsonl)",
    )
    add_connection_options(dashboard, timeout_help="seconds start-up waits for NATS (default: 10)")

    asyncapi = add_command(subparsers, "asyncapi", "write an AsyncAPI 3.0 document of the services")
    asyncapi.add_argument(
        "services",
        nargs="*",
        metavar="MODULE:ATTR",
        help="describe these services (no server needed) instead of the running ones",
    )
    asyncapi.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE (.json, or .yaml; default: stdout)"
    )
    asyncapi.add_argument("--title", default="natsmesh services", help="the document's info.title")
    add_connection_options(asyncapi)
    return {"dashboard": cmd_dashboard, "asyncapi": cmd_asyncapi}
