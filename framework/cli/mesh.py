"""`mesh up|down`: a local mesh of the project's services (see `framework.dev.project`).

    mesh up [--service MODULE:ATTR ...] [--config NATS_CONF] [--port N] [--detach]
    mesh down

The services are the `--service` flags when given, else the project's `[tool.mesh]`
`services` (pyproject.toml) or `mesh.toml`; without any, `mesh up` says how to
configure them and exits 2. It runs in the project's directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..dev.project import Project, ProjectConfigError, find_project, how_to_configure
from ..dev.supervisor import MeshSpec, down, up, up_detached
from ..runner import say
from ._common import (
    CliError,
    ExitCode,
    Handler,
    Subparsers,
    add_command,
    load_spec,
    port,
    seconds,
)

__all__ = ["cmd_down", "cmd_up", "register"]


def _enter_project() -> Project:
    """Find the project, make its root the working directory and importable."""
    try:
        project = find_project()
    except ProjectConfigError as error:
        raise CliError(str(error), ExitCode.USAGE) from None
    os.chdir(project.root)
    if str(project.root) not in sys.path:
        sys.path.insert(0, str(project.root))
    return project


def _service_names(specs: Sequence[str]) -> list[str]:
    names = [load_spec(spec).name for spec in specs]  # fails fast, before any process
    if len(set(names)) != len(names):
        raise CliError(f"a service is listed twice: {', '.join(names)}", ExitCode.USAGE)
    return names


def _spec(args: argparse.Namespace) -> tuple[MeshSpec, str]:
    """The MeshSpec for `args`, and where its services came from (for the first line)."""
    given = Path(args.config).resolve() if args.config else None  # before leaving the cwd
    project = _enter_project()
    services = list(args.service or project.config.services)
    if not services:
        raise CliError(how_to_configure(project), ExitCode.USAGE)
    config = given or project.nats_config
    if config is not None and not config.is_file():
        raise CliError(f"nats-server config not found: {config}", ExitCode.USAGE)
    source = "--service" if args.service else str(project.source)
    spec = MeshSpec(
        services=services,
        names=_service_names(services),
        config=config,
        port=args.port,
        ready_timeout=args.ready_timeout,
        color=not args.no_color,
    )
    return spec, source


def cmd_up(args: argparse.Namespace) -> int:
    """Start nats-server and the services; with --detach in the background."""
    spec, source = _spec(args)
    say(f"{', '.join(spec.names)} (from {source}) in {Path.cwd()}", sys.stdout)
    if not args.detach:
        return up(spec)
    forwarded = [f"--service={service}" for service in spec.services]
    forwarded += [f"--config={spec.config}"] if spec.config else []
    forwarded += [f"--port={spec.port}", f"--ready-timeout={spec.ready_timeout}", "--no-color"]
    return up_detached(spec, forwarded)


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the project's background mesh."""
    _enter_project()
    return down()


def _add_up(subparsers: Subparsers) -> None:
    up = add_command(
        subparsers,
        "up",
        "start nats-server and the project's services ([tool.mesh] in pyproject.toml, "
        "mesh.toml or --service); Ctrl-C stops everything",
        codes=(ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE),
        notes={
            ExitCode.OK: "stopped by Ctrl-C or SIGTERM; with --detach: running in the background",
            ExitCode.FAILURE: "an unexpected error; with --detach: not ready in time, or "
            "already running",
            ExitCode.USAGE: "bad arguments, no services configured, a spec that does not load",
        },
        examples=(
            "mesh up",
            "mesh up --service services.orders:service --service services.payments:service",
            "mesh up --detach",
        ),
        handler=cmd_up,
    )
    up.add_argument(
        "--service",
        action="append",
        metavar="MODULE:ATTR",
        help="a service to start (repeatable; default: `services` of [tool.mesh] or mesh.toml)",
    )
    up.add_argument(
        "--config",
        metavar="FILE",
        help="nats-server config (default: `nats_config` of [tool.mesh] or mesh.toml, if any)",
    )
    up.add_argument("--port", type=port, default=4222, help="client port (default: 4222)")
    up.add_argument(
        "--ready-timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for every service to answer (default: 30)",
    )
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument("--no-color", action="store_true", help="plain log prefixes")


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    """Add `up` and `down` to `mesh`."""
    _add_up(subparsers)
    add_command(
        subparsers,
        "down",
        "stop the project's mesh started with `mesh up --detach`",
        codes=(ExitCode.OK, ExitCode.FAILURE),
        notes={ExitCode.OK: "stopped, or nothing was running"},
        examples=("mesh down",),
        handler=cmd_down,
    )
    return {"up": cmd_up, "down": cmd_down}
