"""`mesh jobs ...`: background jobs from the command line.

    mesh jobs ls [KIND] [--state STATE] [--limit N] [--json]
    mesh jobs show KIND ID [--json]
    mesh jobs enqueue KIND [JSON|-] [--id ID] [--delay SECONDS] [--priority P] [--wait] [--json]
    mesh jobs cancel KIND ID
    mesh jobs retry KIND ID
    mesh jobs schedules [KIND] [--json]
    mesh jobs unschedule KIND NAME

`enqueue --wait` follows the job until it ends: a live progress bar on a terminal,
one plain line per change when stderr is not one (piped, in CI); the result goes to
stdout as JSON. Exit codes are the `mesh` table: 0 done (for `--wait`: succeeded),
2 usage, 3 no such job or schedule, 4 `--timeout` passed while waiting, 5 the payload
does not fit the kind, 6 the job failed or was cancelled (with `--wait`), 7 no NATS.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ..errors import DeadlineExceeded, NotFound
from ..jobs.backend import Backend
from ..jobs.handle import JobHandle
from ..jobs.options import PRIORITIES, Kind
from ..jobs.schedule import Schedule, list_schedules
from ..jobs.status import JOB_STATES, JobStatus, presented
from ._common import (
    CliError,
    ExitCode,
    Handler,
    Subparsers,
    add_command,
    add_connection_options,
    print_json,
    print_result,
    read_payload,
    table,
    with_client,
)

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["register"]

DEFAULT_LIMIT = 50
MESSAGE_WIDTH = 50


def _kind(text: str) -> str:
    try:
        return str(Kind.parse(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _short(text: str, width: int = MESSAGE_WIDTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- ls / show ----------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """`mesh jobs ls`: jobs newest first, as a table or JSON."""

    async def body(client: Client) -> int:
        backend = await Backend.of(client)
        pattern = Kind.parse(args.kind).key_filter if args.kind else "*.*.*"
        found = [presented(s) for s in await backend.store.scan(pattern)]
        found = [s for s in found if args.state is None or s.state == args.state]
        found.sort(key=lambda s: s.enqueued_at or datetime.min, reverse=True)
        print_result(found[: args.limit], args.json, _jobs_table, "no jobs")
        return ExitCode.OK

    return with_client(args, body)


_HEADERS = ("KIND", "ID", "STATE", "PROGRESS", "ATTEMPT", "ENQUEUED", "MESSAGE")


def _jobs_table(found: Sequence[JobStatus]) -> str:
    return table([_row(status) for status in found], _HEADERS)


def _row(status: JobStatus) -> list[object]:
    attempts = f"{status.attempt}/{status.max_attempts}" if status.max_attempts else status.attempt
    note = status.error if status.state in ("retrying", "failed") else status.message
    return [
        status.kind,
        status.id,
        status.state,
        f"{status.progress:.0%}",
        attempts,
        _when(status.enqueued_at),
        _short(note) or None,
    ]


def cmd_show(args: argparse.Namespace) -> int:
    """`mesh jobs show`: one job's whole record."""

    async def body(client: Client) -> int:
        status = await JobHandle(client, args.kind, args.id).status()
        print_result(status, args.json, _details)
        return ExitCode.OK

    return with_client(args, body)


def _details(s: JobStatus) -> str:
    lines = [
        f"Kind:        {s.kind}",
        f"ID:          {s.id}",
        f"State:       {s.state}",
        f"Priority:    {s.priority}",
        f"Progress:    {s.progress:.0%} {s.message}".rstrip(),
        f"Attempt:     {s.attempt} of {s.max_attempts or '?'}",
        f"Enqueued:    {_when(s.enqueued_at)}",
        f"Run at:      {_when(s.run_at)}",
        f"Started:     {_when(s.started_at)}",
        f"Finished:    {_when(s.finished_at)}",
        f"Worker:      {s.worker or '-'}",
        f"Correlation: {s.correlation_id or '-'}",
        f"Trace:       {s.trace_id or '-'}",
    ]
    if s.schedule:
        lines.append(f"Schedule:    {s.schedule}")
    if s.error:
        lines.append(f"Error:       {s.error}")
    for title, value in (("Payload", s.payload), ("Result", s.result)):
        if value is not None:
            text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
            lines += [f"{title}:", *("  " + line for line in text.splitlines())]
    return "\n".join(lines)


# --- enqueue ------------------------------------------------------------------------


def cmd_enqueue(args: argparse.Namespace) -> int:
    """`mesh jobs enqueue`: print the id, or with `--wait` follow it to its result."""
    payload = read_payload(args.payload) if args.payload is not None else b""
    if args.delay is not None and args.delay < 0:
        raise CliError("--delay must not be negative", ExitCode.USAGE)

    async def body(client: Client) -> int:
        handle = await client.enqueue(
            args.kind,
            msgspec.Raw(payload) if payload else None,
            job_id=args.id,
            delay=args.delay,
            priority=args.priority,
        )
        if not args.wait:
            if args.json:
                print_json(await handle.status())
            else:
                print(handle.id)
            return ExitCode.OK
        print(f"{handle.kind}/{handle.id}", file=sys.stderr)
        result = await _follow(handle, getattr(args, "timeout", None))
        print_json(result)
        return ExitCode.OK

    return with_client(args, body)


async def _follow(handle: JobHandle[Any], timeout: float | None) -> Any:
    """Show each change until the job ends; its result, or its error raised."""
    view = _ProgressView(sys.stderr)
    last: JobStatus | None = None
    try:
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            async for status in handle.watch():
                view.show(status)
                last = status
    finally:
        view.close()
    if last is None or not last.final:
        state = last.state if last is not None else "unknown"
        raise DeadlineExceeded(f"{handle.kind}/{handle.id} still {state} after {timeout:g}s")
    return await handle.result()  # final: returns (or raises) at once


class _ProgressView:
    """A tqdm bar on a terminal; one plain line per change otherwise."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._last = ""
        self._bar: Any = None
        if stream.isatty():
            from tqdm import tqdm

            bar_format = "{desc:<10} {bar} {percentage:3.0f}% {elapsed}{postfix}"
            self._bar = tqdm(total=100, file=stream, bar_format=bar_format, leave=True)

    def show(self, status: JobStatus) -> None:
        """Show one status change."""
        note = status.error if status.state == "retrying" else status.message
        if self._bar is not None:
            self._bar.set_description_str(status.state, refresh=False)
            self._bar.set_postfix_str(_short(note, 40), refresh=False)
            self._bar.n = round(status.progress * 100)
            self._bar.refresh()
            return
        line = f"{status.state} {status.progress:.0%} (attempt {status.attempt}) {note}".rstrip()
        if line != self._last:
            print(line, file=self._stream, flush=True)
            self._last = line

    def close(self) -> None:
        """End the display (a bar stays on the screen)."""
        if self._bar is not None:
            self._bar.close()


# --- cancel / retry / schedules ----------------------------------------------------


def cmd_cancel(args: argparse.Namespace) -> int:
    """`mesh jobs cancel`: cancel, or say it had finished already."""

    async def body(client: Client) -> int:
        handle: JobHandle[Any] = JobHandle(client, args.kind, args.id)
        if await handle.cancel():
            print(f"cancelled {handle.kind}/{handle.id}")
        else:
            state = (await handle.status()).state
            print(f"{handle.kind}/{handle.id} already {state}: nothing to cancel")
        return ExitCode.OK

    return with_client(args, body)


def cmd_retry(args: argparse.Namespace) -> int:
    """`mesh jobs retry`: queue a failed or cancelled job again."""

    async def body(client: Client) -> int:
        handle: JobHandle[Any] = await JobHandle(client, args.kind, args.id).retry()
        print(f"queued {handle.kind}/{handle.id} again")
        return ExitCode.OK

    return with_client(args, body)


def cmd_schedules(args: argparse.Namespace) -> int:
    """`mesh jobs schedules`: recurring schedules, as a table or JSON."""

    async def body(client: Client) -> int:
        found = await list_schedules(client, args.kind)
        print_result(found, args.json, _schedules_table, "no schedules")
        return ExitCode.OK

    return with_client(args, body)


def _schedules_table(found: Sequence[Schedule]) -> str:
    rows = [
        (s.kind, s.name, s.spec, s.priority, s.time_zone or None, _payload(s.payload))
        for s in found
    ]
    return table(rows, ("KIND", "NAME", "SCHEDULE", "PRIORITY", "TIME ZONE", "PAYLOAD"))


def _payload(value: Any) -> str | None:
    return _short(msgspec.json.encode(value).decode(), 40) if value is not None else None


def cmd_unschedule(args: argparse.Namespace) -> int:
    """`mesh jobs unschedule`: end a recurring schedule."""

    async def body(client: Client) -> int:
        if not await client.unschedule(args.kind, args.name):
            raise NotFound(f"no schedule {args.name!r} for {args.kind}")
        print(f"removed schedule {args.name} of {args.kind}")
        return ExitCode.OK

    return with_client(args, body)


def cmd_jobs(args: argparse.Namespace) -> int:
    """`mesh jobs` without a command."""
    raise CliError(
        "missing jobs command: ls, show, enqueue, cancel, retry, schedules", ExitCode.USAGE
    )


# --- parser -------------------------------------------------------------------------


_NOTES = {
    ExitCode.NOT_FOUND: "no such job or schedule",
    ExitCode.TIMEOUT: "--timeout passed while `enqueue --wait` waited",
    ExitCode.BAD_REQUEST: "the payload does not fit the kind's schema",
    ExitCode.SERVICE_ERROR: "`enqueue --wait`: the job failed or was cancelled",
}


def _command(
    subparsers: Subparsers, name: str, text: str, handler: Handler, *examples: str
) -> argparse.ArgumentParser:
    command = add_command(subparsers, name, text, notes=_NOTES, examples=examples, handler=handler)
    add_connection_options(command, timeout_help="seconds to wait (enqueue --wait: no limit)")
    return command


def register(subparsers: Subparsers) -> Mapping[str, Handler]:
    """Add `jobs` and its commands to `mesh`."""
    jobs = _command(
        subparsers, "jobs", "background jobs: list, show, enqueue, cancel, retry", cmd_jobs
    )
    commands = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND", required=True)
    _add_ls_show(commands)
    _add_enqueue(commands)
    for name, text, handler in (
        ("cancel", "cancel a job (a running one is stopped within a second)", cmd_cancel),
        ("retry", "queue a failed or cancelled job again, as attempt 1", cmd_retry),
    ):
        command = _command(commands, name, text, handler)
        command.add_argument("kind", type=_kind, metavar="KIND", help="e.g. reports.render")
        command.add_argument("id", metavar="ID", help="the job id")
    schedules = _command(
        commands, "schedules", "list recurring schedules", cmd_schedules, "mesh jobs schedules"
    )
    schedules.add_argument("kind", nargs="?", type=_kind, metavar="KIND", help="only this kind")
    schedules.add_argument("--json", action="store_true", help="print them as JSON")
    unschedule = _command(commands, "unschedule", "end a recurring schedule", cmd_unschedule)
    unschedule.add_argument("kind", type=_kind, metavar="KIND")
    unschedule.add_argument("name", metavar="NAME", help="from `mesh jobs schedules`")
    return {"jobs": cmd_jobs}


def _add_ls_show(commands: Subparsers) -> None:
    ls = _command(commands, "ls", "list jobs, newest first", cmd_ls, "mesh jobs ls --limit 10")
    ls.add_argument("kind", nargs="?", type=_kind, metavar="KIND", help="only this kind")
    ls.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    ls.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N", help="at most N")
    ls.add_argument("--json", action="store_true", help="print the statuses as JSON")
    show = _command(commands, "show", "one job's status, payload and result", cmd_show)
    show.add_argument("kind", type=_kind, metavar="KIND", help="e.g. reports.render")
    show.add_argument("id", metavar="ID", help="the job id")
    show.add_argument("--json", action="store_true", help="print the status as JSON")


def _add_enqueue(commands: Subparsers) -> None:
    enqueue = _command(
        commands, "enqueue", "enqueue a job; --wait follows it to the end", cmd_enqueue
    )
    enqueue.add_argument("kind", type=_kind, metavar="KIND", help="e.g. reports.render")
    enqueue.add_argument("payload", nargs="?", metavar="JSON", help="the payload; - reads stdin")
    enqueue.add_argument("--id", metavar="ID", help="job id: unique among unfinished jobs")
    enqueue.add_argument("--delay", type=float, metavar="SECONDS", help="start it later")
    enqueue.add_argument("--priority", choices=PRIORITIES, default="normal")
    enqueue.add_argument("--wait", action="store_true", help="follow it and print its result")
    enqueue.add_argument("--json", action="store_true", help="print the status as JSON")
