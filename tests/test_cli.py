"""The `mesh` command line against real nats-server processes.

Most tests call `main(argv)` in-process (in a worker thread when a service runs in the
test's event loop, since `main` starts a loop of its own); the `mesh run` test and a few
others run the real console script or `python -m framework.cli` as a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import anyio
import msgspec
import pytest
from support.cli import mesh, mesh_cli, mesh_command, project_env

import framework.cli.main as cli
import framework.cli.services as cli_services
from framework import BadRequest, Service, ServiceError
from framework.cli._common import table
from framework.cli.main import ExitCode, build_parser, main
from framework.dev.devserver import free_port


class Hello(msgspec.Struct):
    name: str


class Greeting(msgspec.Struct):
    text: str


def greeter() -> Service:
    svc = Service("greeter", version="0.1.0", description="Says hello")

    @svc.rpc()
    async def hello(req: Hello) -> Greeting:
        if not req.name:
            raise BadRequest("name must not be empty")
        return Greeting(text=f"hello {req.name}")

    @svc.rpc()
    async def teapot() -> None:
        raise ServiceError(418, "I'm a teapot")

    @svc.rpc()
    async def crash() -> None:
        raise RuntimeError("secret internal detail")

    @svc.rpc()
    async def slow() -> None:
        await anyio.sleep(1)

    return svc


# --- help and parser -------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("run", "call", "ls", "info", "stats"):
        assert command in out
    for code in ExitCode:
        assert f"\n  {int(code):<4} " in out
        assert f"\n    {int(code):<4} " in (cli.__doc__ or "")


@pytest.mark.parametrize("command", sorted(build_parser()[1]))
def test_every_subcommand_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mesh {command} ")
    assert "--url" in out and "exit codes:" in out


def test_usage_errors_exit_2(capsys):
    assert main([]) == ExitCode.USAGE
    assert main(["frobnicate"]) == ExitCode.USAGE
    assert main(["call"]) == ExitCode.USAGE
    assert main(["--timeout", "-1", "ls"]) == ExitCode.USAGE
    assert main(["run", "x:y", "--grace", "soon"]) == ExitCode.USAGE
    assert "usage: mesh" in capsys.readouterr().err


def test_extension_module_registers_commands(monkeypatch, capsys):
    """`framework.cli.events.register(subparsers)` plugs commands in (publish, dlq ...)."""

    def register(subparsers):
        publish = subparsers.add_parser("publish", help="publish an event")
        publish.add_argument("event_type")
        dlq = subparsers.add_parser("dlq", help="dead letters")
        dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
        dlq_commands.add_parser("ls").set_defaults(handler=lambda args: 42)
        return {"publish": lambda args: print(f"published {args.event_type} to {args.url}") or 0}

    fake = types.ModuleType("framework.cli.events")
    fake.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "framework.cli.events", fake)

    _, handlers = build_parser()
    assert {"run", "call", "ls", "info", "stats", "publish"} <= set(handlers)
    assert main(["publish", "order.created.v1", "--url", "nats://h:1"]) == 0
    assert capsys.readouterr().out == "published order.created.v1 to nats://h:1\n"
    assert main(["dlq", "ls"]) == 42
    assert main(["publish", "--help"]) == 0  # common options were added for it
    assert "--timeout" in capsys.readouterr().out


def test_table_aligns_columns():
    text = table([("a", 1, None), ("longer", 22, "x y\nz")], ("NAME", "N", "NOTE"))
    assert text.splitlines() == [
        "NAME    N   NOTE",
        "a       1   -",
        "longer  22  x y z",
    ]


# --- call ------------------------------------------------------------------------------


async def test_call_prints_reply_as_json(serve, nats_url, capsys):
    await serve(greeter())
    capsys.readouterr()  # the in-test service logs to stdout (structlog's default)
    code = await mesh("--url", nats_url, "call", "greeter.hello", '{"name": "ann"}')
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out) == {"text": "hello ann"}
    assert out.startswith('{\n  "text"')  # pretty-printed


async def test_url_and_timeout_accepted_after_the_command(serve, nats_url, capsys):
    await serve(greeter())
    capsys.readouterr()
    args = ("call", "greeter.hello", '{"name": "bo"}', "--url", nats_url, "--timeout", "2")
    assert await mesh(*args, "-H", "X-Trace=1") == 0
    assert json.loads(capsys.readouterr().out) == {"text": "hello bo"}


def test_invalid_json_exits_2_before_connecting(capsys):
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: must fail before connecting
    assert main(["--url", url, "call", "greeter.hello", '{"name": ']) == ExitCode.USAGE
    assert "invalid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["call", "greeter.hello", "{}", "--header", "no-equals"], "invalid header"),
        (["call", "greeter.hello", "{}", "-H", "X-A=line\nbreak"], "control characters"),
        (["call", "greeter.*", "{}"], "invalid subject"),
        (["info", "gree.ter"], "invalid service name"),
        (["up", "--port", "70000"], "must be from 1 to 65535"),
    ],
)
def test_bad_arguments_exit_2(argv, fragment, capsys):
    assert main(argv) == ExitCode.USAGE
    assert fragment in capsys.readouterr().err


async def test_unknown_subject_exits_3_no_responders(nats_url, capsys):
    assert await mesh("--url", nats_url, "call", "nobody.home", "{}") == ExitCode.NOT_FOUND
    assert "error 503: no responders" in capsys.readouterr().err


async def test_unknown_endpoint_exits_3(serve, nats_url, capsys):
    await serve(greeter())
    assert await mesh("--url", nats_url, "call", "greeter.nope") == ExitCode.NOT_FOUND
    err = capsys.readouterr().err
    assert err.startswith("error 404: ") and "greeter.hello" in err


@pytest.mark.parametrize(
    "subject, suggestion",
    [
        ("events.payment.captured.v1", "mesh publish payment.captured.v1 JSON"),
        ("events.order.created.v1.o-1", "mesh publish order.created.v1 JSON"),  # keyed
        ("events.Bad", "mesh publish TYPE JSON"),
        ("events", "mesh publish TYPE JSON"),
    ],
)
def test_call_refuses_event_subjects_and_points_to_publish(subject, suggestion, capsys):
    """A request to `events.>` would store a raw, headerless event: refused before connecting."""
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: the refusal comes first
    assert main(["--url", url, "call", subject, "{}"]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert f"mesh: {subject} is an event subject" in err
    assert suggestion in err


async def test_not_found_lists_only_request_reply_endpoints(serve, nats_url, capsys):
    svc = greeter()

    @svc.subscribe("greeting.sent.v1")
    async def on_greeting_sent(event: Greeting) -> None:
        return None

    await serve(svc)
    assert await mesh("--url", nats_url, "call", "greeter.nope") == ExitCode.NOT_FOUND
    err = capsys.readouterr().err
    assert err.startswith("error 404: ") and "greeter.hello" in err and "greeter.slow" in err
    assert "events." not in err and "greeting.sent" not in err


async def test_bad_request_exits_5(serve, nats_url, capsys):
    await serve(greeter())
    code = await mesh("--url", nats_url, "call", "greeter.hello", '{"name": ""}')
    assert code == ExitCode.BAD_REQUEST
    assert capsys.readouterr().err == "error 400: name must not be empty\n"
    # invalid against the request schema: the framework answers 400 as well
    assert await mesh("--url", nats_url, "call", "greeter.hello", "[1]") == ExitCode.BAD_REQUEST


async def test_other_service_errors_exit_6(serve, nats_url, capsys):
    await serve(greeter())
    assert await mesh("--url", nats_url, "call", "greeter.teapot") == ExitCode.SERVICE_ERROR
    assert capsys.readouterr().err == "error 418: I'm a teapot\n"
    assert await mesh("--url", nats_url, "call", "greeter.crash") == ExitCode.SERVICE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error 500: ") and "secret" not in err


async def test_timeout_exits_4(serve, nats_url, capsys):
    await serve(greeter())
    code = await mesh("--url", nats_url, "call", "greeter.slow", "--timeout", "0.2")
    assert code == ExitCode.TIMEOUT
    assert capsys.readouterr().err.startswith(("error 408: ", "mesh: timed out"))


# --- discovery -------------------------------------------------------------------------


async def test_ls_info_stats_show_services_endpoints_and_counts(serve, nats_url, capsys):
    await serve(greeter())
    capsys.readouterr()
    for name in ("ann", "", "bo"):
        await mesh("--url", nats_url, "call", "greeter.hello", json.dumps({"name": name}))
    capsys.readouterr()

    assert await mesh("--url", nats_url, "ls") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ID", "VERSION"]
    assert row.split()[0] == "greeter" and row.split()[2] == "0.1.0"

    assert await mesh("--url", nats_url, "info", "greeter") == 0
    out = capsys.readouterr().out
    assert "Service:     greeter" in out and "Description: Says hello" in out
    assert out.count("  NAME") == 1 and "SUBJECT" in out and "KIND" in out
    endpoints = {line.split()[0]: line.split() for line in out.splitlines()[5:]}
    assert endpoints["hello"] == ["hello", "greeter.hello", "greeter", "rpc"]
    assert {"teapot", "crash", "slow"} <= set(endpoints)

    assert await mesh("--url", nats_url, "stats") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["SERVICE", "ID", "ENDPOINT", "REQUESTS", "ERRORS", "AVG(ms)"]
    assert lines[0].endswith("LAST ERROR")
    rows = {line.split()[2]: line.split() for line in lines[1:]}
    assert rows["hello"][3:5] == ["3", "1"]
    assert lines[1 + list(rows).index("hello")].endswith("name must not be empty")
    assert rows["teapot"][3:5] == ["0", "0"]


async def test_json_output_is_the_raw_responses(serve, nats_url, capsys):
    await serve(greeter())
    capsys.readouterr()
    await mesh("--url", nats_url, "call", "greeter.hello", '{"name": "ann"}')
    capsys.readouterr()
    assert await mesh("--url", nats_url, "stats", "greeter", "--json") == 0
    (stats,) = json.loads(capsys.readouterr().out)
    assert stats["type"] == "io.nats.micro.v1.stats_response"
    by_name = {e["name"]: e for e in stats["endpoints"]}
    assert by_name["hello"]["num_requests"] == 1
    assert await mesh("--url", nats_url, "info", "--json") == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["name"] == "greeter" and info["type"] == "io.nats.micro.v1.info_response"
    assert await mesh("--url", nats_url, "ls", "--json") == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["greeter"]


def test_subscriber_columns_appear_when_reported(monkeypatch, capsys):
    """A subscriber's `data` (pending, redelivered, dead_lettered) gets its own columns."""
    from framework.rpc.discovery import EndpointStats, StatsResponse

    response = StatsResponse(
        name="notifier",
        id="abc",
        version="1",
        started="2024-01-01T00:00:00Z",
        endpoints=[
            EndpointStats(name="send", subject="notifier.send", num_requests=4),
            EndpointStats(
                name="on_order",
                subject="events.order.created.v1",
                num_requests=7,
                num_errors=2,
                last_error="boom",
                data={"pending": 5, "redelivered": 1, "dead_lettered": 1},
            ),
        ],
    )

    class FakeClient:
        async def stats(self, name, *, timeout):
            return [response]

    def fake_with_client(args, body):
        return anyio.run(body, FakeClient(), backend="asyncio")

    monkeypatch.setattr(cli_services, "with_client", fake_with_client)
    assert main(["stats"]) == 0
    header, send, on_order = capsys.readouterr().out.splitlines()
    assert header.split()[6:] == ["PENDING", "REDELIVERED", "DEAD-LETTERED", "LAST", "ERROR"]
    assert send.split()[6:] == ["-", "-", "-", "-"]
    assert on_order.split()[2:] == ["on_order", "7", "2", "0.000", "5", "1", "1", "boom"]


async def test_nothing_found(nats_url, capsys):
    assert await mesh("--url", nats_url, "--timeout", "0.2", "ls") == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "no services\n")
    for command in ("info", "stats"):
        assert await mesh("--url", nats_url, "--timeout", "0.2", command, "ghost") == 3
        assert "no service named 'ghost'" in capsys.readouterr().err


# --- connection failures ---------------------------------------------------------------


@pytest.mark.parametrize("argv", [["ls"], ["info"], ["call", "greeter.hello", "{}"]])
def test_cannot_connect_exits_7_quickly(argv, capsys):
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["--url", url, *argv]) == ExitCode.NO_CONNECTION
    assert time.monotonic() - started < 5
    captured = capsys.readouterr()
    assert f"cannot connect to NATS at {url}" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cannot_connect_subprocess_uses_nats_url(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "NATS_URL": url}
    done = subprocess.run(
        [*mesh_command(), "ls"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == ExitCode.NO_CONNECTION
    assert url in done.stderr and "Traceback" not in done.stderr


# --- mesh run --------------------------------------------------------------------------

SAMPLE_MODULE = textwrap.dedent(
    """
    import msgspec
    from framework import Service

    class Hello(msgspec.Struct):
        name: str

    svc = Service("clisample", version="2.0.0")
    not_a_service = 42

    @svc.rpc()
    async def hello(req: Hello) -> dict[str, str]:
        return {"text": "hello " + req.name}
    """
)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_module_xyz:svc", "No module named 'no_such_module_xyz'"),
        ("cli_sample_bad:missing", "has no attribute 'missing'"),
        ("cli_sample_bad:not_a_service", "is not a framework.Service"),
        (":svc", "expected MODULE:ATTR"),
    ],
)
def test_run_with_a_bad_spec_exits_2(spec, fragment, tmp_path, capsys, monkeypatch):
    (tmp_path / "cli_sample_bad.py").write_text(SAMPLE_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the --app-dir insertion
    try:
        assert main(["run", spec, "--app-dir", str(tmp_path)]) == ExitCode.USAGE
    finally:
        sys.modules.pop("cli_sample_bad", None)
    assert fragment in capsys.readouterr().err


def wait_until_listed(url: str, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while main(["--url", url, "--timeout", "0.2", "info", name]) != 0:
        assert time.monotonic() < deadline, f"{name} did not start"


def test_mesh_run_serves_until_sigterm(tmp_path, nats_url, capsys):
    (tmp_path / "cli_sample.py").write_text(SAMPLE_MODULE)
    env = project_env(NATS_URL=nats_url)
    runner = subprocess.Popen(
        [*mesh_command(), "run", "cli_sample:svc", "--grace", "2"],
        cwd=tmp_path,  # --app-dir defaults to ".", as with uvicorn
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_listed(nats_url, "clisample")

        done = subprocess.run(
            [*mesh_command(), "call", "clisample.hello", '{"name": "ann"}'],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, json.loads(done.stdout)) == (0, {"text": "hello ann"})

        # the module form, with the payload on stdin
        done = mesh_cli("call", "clisample.hello", "-", env=env, stdin='{"name": "bo"}', timeout=30)
        assert (done.returncode, json.loads(done.stdout)) == (0, {"text": "hello bo"})

        runner.send_signal(signal.SIGTERM)
        _, err = runner.communicate(timeout=20)
        assert runner.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()

    capsys.readouterr()
    assert main(["--url", nats_url, "call", "clisample.hello", '{"name": "x"}']) == 3
