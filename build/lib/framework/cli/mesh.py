"""`mesh up|down|demo`: the local mesh of the sample services."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..dev.supervisor import DEFAULT_SERVICES, MeshSpec, down, up, up_detached

if TYPE_CHECKING:
    from .main import Handler, Subparsers

__all__ = ["register"]


def _spec(args: argparse.Namespace) -> MeshSpec:
    return MeshSpec(
        services=tuple(args.service or DEFAULT_SERVICES),
        config=Path(args.config),
        port=args.port,
        ready_timeout=args.ready_timeout,
        color=not args.no_color,
    )


def cmd_up(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.detach:
        forwarded = [f"--service={s}" for s in spec.services]
        forwarded += [f"--config={spec.config}", f"--port={spec.port}", "--no-color"]
        return up_detached(spec, forwarded)
    return up(spec)


def cmd_down(args: argparse.Namespace) -> int:
    return down()


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    code: int = run_demo(args.url, orders=args.orders)
    return code


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    from .main import _subparser

    up_parser = _subparser(
        subparsers, "up", "start nats-server (nats.conf) and the sample services"
    )
    up_parser.add_argument(
        "--service",
        action="append",
        metavar="MODULE:ATTR",
        help=f"a service to start (repeatable; default: {', '.join(DEFAULT_SERVICES)})",
    )
    up_parser.add_argument(
        "--config", default="nats.conf", help="nats-server config (default: nats.conf)"
    )
    up_parser.add_argument("--port", type=int, default=4222, help="client port (default: 4222)")
    up_parser.add_argument("--ready-timeout", type=float, default=30.0, metavar="SECONDS")
    up_parser.add_argument("--detach", action="store_true", help="run in the background")
    up_parser.add_argument("--no-color", action="store_true", help="plain log prefixes")
    down_parser = _subparser(subparsers, "down", "stop a mesh started with `mesh up --detach`")
    demo = _subparser(subparsers, "demo", "place orders on a running mesh and show what happened")
    demo.add_argument("--orders", type=int, default=6, help="how many orders (default: 6)")
    del down_parser
    return {"up": cmd_up, "down": cmd_down, "demo": cmd_demo}
