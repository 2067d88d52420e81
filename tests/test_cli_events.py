"""`mesh publish` and `mesh dlq ls|show|replay` against real nats-server processes.

Commands run in-process through `main(argv)` (in a worker thread, since `main` starts an
event loop of its own while the services run in the test's loop), and a few as the
installed console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import anyio
import pytest
from support.cli import mesh, mesh_command
from support.events import OrderCreated

from framework import Context, DeadLetter, Service, list_dead_letters
from framework.cli.main import ExitCode, main
from framework.dev.devserver import free_port
from framework.events.deadletter import send_to_dead_letter
from framework.testing import eventually as wait_until


async def wait_for_dead_letters(client: Any, count: int, timeout: float = 10.0) -> list[DeadLetter]:
    async def enough() -> list[DeadLetter] | None:
        letters = await list_dead_letters(client)
        return letters if len(letters) >= count else None

    found: list[DeadLetter] = await wait_until(enough, timeout, f"{count} dead letters")
    return found


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a `mesh` table as dicts, cut at the header's column starts.

    Columns are separated by two spaces or more; a title may hold one ("EVENT TYPE").
    """
    header, *lines = text.splitlines()
    columns = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in columns[1:]] + [None]
    return [
        {title: line[start:end].strip() for (title, start), end in zip(columns, ends, strict=True)}
        for line in lines
    ]


class Handled:
    """What a subscriber saw: payloads, event ids, correlation ids and headers."""

    def __init__(self) -> None:
        self.events: list[OrderCreated] = []
        self.contexts: list[Context] = []
        self.attempts = 0
        self.fixed = False

    @property
    def event_ids(self) -> list[str | None]:
        return [ctx.event_id for ctx in self.contexts]


def payments(handled: Handled, *, failing: bool = False) -> Service:
    svc = Service("payments", version="1.0.0")

    @svc.subscribe("order.created.v1", max_deliver=2, backoff=[0.05])
    async def on_order(event: OrderCreated, ctx: Context) -> None:
        handled.attempts += 1
        if failing and not handled.fixed:
            raise ValueError(f"provider unavailable for {event.order_id}")
        handled.events.append(event)
        handled.contexts.append(ctx)

    return svc


# --- help and usage (no server needed) -------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["publish"], ["dlq"], ["dlq", "ls"], ["dlq", "show"], ["dlq", "replay"]],
)
def test_every_event_command_has_help(argv, capsys):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mesh {' '.join(argv)} ")
    assert "--url" in out and "--timeout" in out and "exit codes:" in out


def test_top_level_help_lists_event_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "publish" in out and "dlq" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["publish", "Order.Created", "{}"], "invalid event type"),
        (["publish", "order.created.v1", '{"order_id": '], "invalid JSON"),
        (["publish", "order.created.v1", "{}", "--event-id", "has space"], "invalid --event-id"),
        (["publish", "order.created.v1", "{}", "--correlation-id", ""], "invalid --correlation-id"),
        (["publish", "order.created.v1", "{}", "-H", "no-equals"], "invalid header"),
        (["publish", "order.created.v1", "{}", "-H", "Nats-Msg-Id=x"], "use --event-id"),
        (["publish", "order.created.v1", "{}", "-H", "X-A=a\x01b"], "control characters"),
        (["dlq", "replay"], "give dead letter IDs or --all"),
        (["dlq", "replay", "1", "--all"], "give dead letter IDs or --all"),
        (["dlq", "replay", "1", "--service", "payments"], "--service goes with --all"),
        (["dlq", "replay", "--all", "--service", "a.b"], "invalid service name"),
        (["dlq", "ls", "--service", "pay*"], "invalid service name"),
        (["dlq", "show", "abc"], "not a dead letter ID"),
        (["dlq", "show", "0"], "not a dead letter ID"),
        (["dlq", "ls", "--limit", "0"], "must be 1 or more"),
        (["dlq"], "required"),
    ],
)
def test_usage_errors_exit_2_before_connecting(argv, fragment, capsys):
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: must fail before connecting
    assert main(["--url", url, *argv]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert fragment in err and "cannot connect" not in err


@pytest.mark.parametrize("argv", [["publish", "order.created.v1", "{}"], ["dlq", "ls"]])
def test_cannot_connect_exits_7(argv, capsys):
    url = f"nats://127.0.0.1:{free_port()}"
    assert main([*argv, "--url", url]) == ExitCode.NO_CONNECTION
    assert f"cannot connect to NATS at {url}" in capsys.readouterr().err


# --- publish ---------------------------------------------------------------------------


async def test_published_event_reaches_a_running_subscriber(serve, nats_url, capsys):
    handled = Handled()
    await serve(payments(handled))
    capsys.readouterr()
    code = await mesh(
        "publish",
        "order.created.v1",
        '{"order_id": "o-1", "amount_cents": 500}',
        "--event-id",
        "order-o-1",
        "--correlation-id",
        "corr-1",
        "-H",
        "X-Tenant=t1",
        "--url",
        nats_url,
    )
    assert code == 0
    assert capsys.readouterr().out == "stored in EVENTS_ORDER seq 1 event order-o-1\n"
    await wait_until(lambda: len(handled.events) == 1)
    assert handled.events == [OrderCreated("o-1", 500)]
    (ctx,) = handled.contexts
    assert (ctx.event_id, ctx.correlation_id) == ("order-o-1", "corr-1")
    assert ctx.headers is not None and ctx.headers["X-Tenant"] == "t1"
    assert ctx.headers["Event-Type"] == "order.created.v1"


async def test_same_event_id_is_reported_as_a_duplicate(serve, nats_url, capsys):
    handled = Handled()
    await serve(payments(handled))
    argv = (
        "--url",
        nats_url,
        "publish",
        "order.created.v1",
        '{"order_id": "o-2", "amount_cents": 1}',
    )
    assert await mesh(*argv, "--event-id", "evt-dup") == 0
    assert await mesh(*argv, "--event-id", "evt-dup") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "stored in EVENTS_ORDER seq 1 event evt-dup"
    assert out[1].startswith("duplicate of seq 1 ")
    assert await mesh(*argv, "--event-id", "evt-dup", "--json") == 0
    ack = json.loads(capsys.readouterr().out)
    assert ack == {"stream": "EVENTS_ORDER", "seq": 1, "event_id": "evt-dup", "duplicate": True}
    # without --event-id every publish is a new event
    assert await mesh(*argv, "--json") == 0
    fresh = json.loads(capsys.readouterr().out)
    assert (fresh["seq"], fresh["duplicate"]) == (2, False) and fresh["event_id"] != "evt-dup"
    await wait_until(lambda: len(handled.events) == 2)
    await anyio.sleep(0.2)
    assert handled.event_ids == ["evt-dup", fresh["event_id"]]


async def test_type_no_stream_captures_exits_3(nats_url, capsys):
    code = await mesh("--url", nats_url, "publish", "ghost.appeared.v1", '{"x": 1}')
    assert code == ExitCode.NOT_FOUND
    captured = capsys.readouterr()
    assert "no stream captures events.ghost.appeared.v1" in captured.err
    assert captured.out == "" and "Traceback" not in captured.err


async def test_publish_from_stdin_as_a_subprocess(serve, nats_url):
    handled = Handled()
    await serve(payments(handled))
    done = await anyio.run_process(
        [*mesh_command(), "publish", "order.created.v1", "-", "--event-id", "stdin-1"],
        input=b'{"order_id": "o-3", "amount_cents": 7}',
        env={**os.environ, "NATS_URL": nats_url},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == "stored in EVENTS_ORDER seq 1 event stdin-1\n"
    await wait_until(lambda: len(handled.events) == 1)
    assert handled.events == [OrderCreated("o-3", 7)] and handled.event_ids == ["stdin-1"]


# --- dead letters ----------------------------------------------------------------------


async def test_dead_letter_listed_shown_and_replayed(serve, client, nats_url, capsys):
    handled = Handled()
    await serve(payments(handled, failing=True))
    assert await mesh("--url", nats_url, "dlq", "ls") == 0
    assert "no dead letters" in capsys.readouterr().err

    payload = '{"order_id": "o-9", "amount_cents": 900}'
    argv = ("publish", "order.created.v1", payload, "--event-id", "evt-9", "-H", "X-Tenant=t1")
    assert await mesh(*argv, "--url", nats_url) == 0
    (letter,) = await wait_for_dead_letters(client, 1)
    assert handled.attempts == 2 and handled.events == []
    capsys.readouterr()

    # ls: a table with one row
    assert await mesh("dlq", "ls", "--url", nats_url) == 0
    (row,) = parse_table(capsys.readouterr().out)
    assert row == {
        "ID": str(letter.id),
        "SERVICE": "payments",
        "HANDLER": "on_order",
        "REASON": "max_deliver",
        "ATTEMPTS": "2",
        "EVENT TYPE": "order.created.v1",
        "EVENT ID": "evt-9",
        "AGE": row["AGE"],
        "ERROR": "ValueError: provider unavailable for o-9",
    }
    assert row["AGE"].endswith("s")
    assert await mesh("dlq", "ls", "--service", "shipping", "--url", nats_url) == 0
    assert "no dead letters for service shipping" in capsys.readouterr().err
    assert await mesh("dlq", "ls", "--json", "--service", "payments", "--url", nats_url) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["id"], listed["reason"], listed["attempts"]) == (letter.id, "max_deliver", 2)

    # the real console script, with --url
    done = await anyio.run_process([*mesh_command(), "dlq", "ls", "--url", nats_url], check=False)
    assert done.returncode == 0, done.stderr.decode()
    (row,) = parse_table(done.stdout.decode())
    assert (row["ID"], row["REASON"], row["EVENT ID"]) == (str(letter.id), "max_deliver", "evt-9")

    # show: every field, the original headers and the payload as pretty JSON
    assert await mesh("dlq", "show", str(letter.id), "--url", nats_url) == 0
    out = capsys.readouterr().out
    for line in (
        f"ID:          {letter.id}",
        "Service:     payments",
        "Handler:     on_order",
        "Reason:      max_deliver",
        "Error:       ValueError: provider unavailable for o-9",
        "Attempts:    2",
        "Event type:  order.created.v1",
        "Event ID:    evt-9",
        "Subject:     events.order.created.v1",
        "Stream:      EVENTS_ORDER seq 1",
    ):
        assert line in out.splitlines(), line
    assert "Dead since:  " in out and " ago)" in out
    assert "  X-Tenant:" in out and "t1" in out
    assert 'Payload:\n{\n  "order_id": "o-9",\n  "amount_cents": 900\n}' in out
    assert await mesh("dlq", "show", str(letter.id), "--json", "--url", nats_url) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["headers"]["X-Tenant"] == "t1" and json.loads(shown["data"]) == json.loads(payload)
    assert (shown["error"], shown["attempts"]) == ("ValueError: provider unavailable for o-9", 2)

    # fixed: the replay is handled, under the original event id, and the letter is gone
    handled.fixed = True
    assert await mesh("dlq", "replay", str(letter.id), "--url", nats_url) == 0
    assert capsys.readouterr().out == f"replayed {letter.id} -> events.order.created.v1 seq 2\n"
    await wait_until(lambda: len(handled.events) == 1)
    assert handled.events == [OrderCreated("o-9", 900)] and handled.event_ids == ["evt-9"]
    assert await mesh("dlq", "ls", "--url", nats_url) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no dead letters" in captured.err
    assert await mesh("dlq", "show", str(letter.id), "--url", nats_url) == ExitCode.NOT_FOUND
    assert f"no dead letter {letter.id}" in capsys.readouterr().err


async def test_replay_all_replays_every_dead_letter(serve, client, nats_url, capsys):
    handled = Handled()
    await serve(payments(handled, failing=True))
    for n in range(3):
        body = json.dumps({"order_id": f"o-{n}", "amount_cents": n})
        assert (
            await mesh(
                "--url", nats_url, "publish", "order.created.v1", body, "--event-id", f"e-{n}"
            )
            == 0
        )
    letters = await wait_for_dead_letters(client, 3)
    capsys.readouterr()
    assert await mesh("--url", nats_url, "dlq", "ls") == 0
    assert len(parse_table(capsys.readouterr().out)) == 3
    assert await mesh("--url", nats_url, "dlq", "ls", "--limit", "2") == 0
    assert [r["ID"] for r in parse_table(capsys.readouterr().out)] == [
        str(d.id) for d in letters[:2]
    ]

    # another service's letters only: there are none, nothing happens
    assert await mesh("--url", nats_url, "dlq", "replay", "--all", "--service", "shipping") == 0
    assert "no dead letters for service shipping" in capsys.readouterr().err
    assert len(await list_dead_letters(client)) == 3

    handled.fixed = True
    code = await mesh("--url", nats_url, "dlq", "replay", "--all", "--service", "payments")
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == [str(d.id) for d in letters]
    assert all(" -> events.order.created.v1 seq " in line for line in out)
    await wait_until(lambda: len(handled.events) == 3)
    assert sorted(handled.event_ids) == ["e-0", "e-1", "e-2"]  # type: ignore[type-var]
    assert await list_dead_letters(client) == []
    assert await mesh("--url", nats_url, "dlq", "replay", "--all") == 0
    assert "no dead letters" in capsys.readouterr().err


async def test_unknown_ids_exit_3_and_failed_replays_exit_1(serve, client, nats_url, capsys):
    handled = Handled()
    await serve(payments(handled, failing=True))
    body = '{"order_id": "o-5", "amount_cents": 5}'
    assert await mesh("--url", nats_url, "publish", "order.created.v1", body) == 0
    (real,) = await wait_for_dead_letters(client, 1)
    # a dead letter whose original subject no stream captures any more: its replay fails
    await send_to_dead_letter(
        client,
        service="legacy",
        handler="on_ghost",
        reason="rejected",
        error="gone",
        attempts=1,
        subject="events.ghost.appeared.v1",
        stream="EVENTS_GHOST",
        sequence=1,
        event_id="ghost-1",
        data=b"not json",
        original_headers={"Event-Type": "ghost.appeared.v1"},
    )
    real, ghost = await wait_for_dead_letters(client, 2)
    capsys.readouterr()

    assert await mesh("--url", nats_url, "dlq", "show", "999") == ExitCode.NOT_FOUND
    assert "no dead letter 999" in capsys.readouterr().err
    assert await mesh("--url", nats_url, "dlq", "show", str(ghost.id)) == 0
    assert "Payload:\nnot json\n" in capsys.readouterr().out  # not JSON: shown as stored

    # an unknown ID among known ones: the others are replayed, then exit 3
    handled.fixed = True
    assert await mesh("--url", nats_url, "dlq", "replay", "999", str(real.id)) == ExitCode.NOT_FOUND
    captured = capsys.readouterr()
    assert "no dead letter 999" in captured.err
    assert captured.out.startswith(f"replayed {real.id} -> events.order.created.v1 seq ")
    await wait_until(lambda: len(handled.events) == 1)

    # a failed replay: reported, the rest continue, exit 1 (over 3), the letter is kept
    code = await mesh("--url", nats_url, "dlq", "replay", str(ghost.id), "998", "--json")
    assert code == ExitCode.FAILURE
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [(r["id"], r["replayed"]) for r in results] == [(ghost.id, False), (998, False)]
    assert results[0]["error"].startswith(f"replay of dead letter {ghost.id} failed")
    assert results[1]["error"] == "not found"
    assert f"replay of dead letter {ghost.id} failed" in captured.err
    assert [d.id for d in await list_dead_letters(client)] == [ghost.id]


async def test_dlq_on_a_server_without_dead_letters(nats_url, capsys):
    assert await mesh("--url", nats_url, "dlq", "ls", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert await mesh("--url", nats_url, "dlq", "show", "999") == ExitCode.NOT_FOUND
    assert await mesh("--url", nats_url, "dlq", "replay", "999") == ExitCode.NOT_FOUND
    assert "no dead letter 999" in capsys.readouterr().err
