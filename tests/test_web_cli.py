"""`mesh dashboard` as a user starts it: its start line, its bind, credentials, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.cli import MESH_MODULE
from web_support import http_server

from framework.cli.main import main
from framework.dev.devserver import NatsServer, free_port
from framework.web.dashboard import create_app


def start_dashboard(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*MESH_MODULE, "dashboard", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def stop(process: subprocess.Popen[str]) -> tuple[str, str]:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return out, err


def test_mesh_dashboard_says_it_binds_to_loopback_and_serves(nats_url: str) -> None:
    port = free_port()
    process = start_dashboard("--port", str(port), "--url", nats_url, "--interval", "0.5")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(f"mesh dashboard: http://127.0.0.1:{port}/ (bound to 127.0.0.1")
        assert "this machine only" in line
        health = _get_when_up(f"http://127.0.0.1:{port}/api/health")
        assert health["connected"] is True
    finally:
        stop(process)


def _get_when_up(url: str) -> Any:
    import time

    deadline = time.monotonic() + 20
    while True:
        try:
            return httpx.get(url, timeout=2).json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_mesh_dashboard_without_nats_exits_7_with_a_reason() -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    process = start_dashboard("--port", str(free_port()), "--url", dead)
    _, err = stop_after_exit(process)
    assert process.returncode == 7
    assert f"cannot connect to NATS at {dead}" in err
    assert "Traceback" not in err


def stop_after_exit(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return process.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        return stop(process)


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "x"], ["--interval", "0"]])
def test_bad_dashboard_arguments_are_usage_errors(args: list[str]) -> None:
    assert main(["dashboard", *args]) == 2


def test_a_non_loopback_bind_says_it_can_be_reached() -> None:
    from framework.cli.web import _start_line

    assert "reachable from the network" in _start_line("0.0.0.0", 8484)


async def test_the_dashboard_uses_the_configured_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text('authorization { user: watcher, password: "s3cret-pw" }\n')
    with NatsServer(config_file=conf, store_dir=tmp_path / "js") as server:
        monkeypatch.setenv("NATS_USER", "watcher")
        monkeypatch.setenv("NATS_PASSWORD", "s3cret-pw")
        async with (
            http_server(create_app(server.url, interval=0.3)) as base,
            httpx.AsyncClient(base_url=base) as http,
        ):
            health = (await http.get("/api/health")).json()
            page = await http.get("/api/streams")
    assert health["connected"] is True
    assert page.status_code == 200
    assert "s3cret-pw" not in str(health)


def test_framework_itself_does_not_import_the_web_stack() -> None:
    code = "import sys, framework; sys.exit(any(m.split('.')[0] in ('starlette', 'fastapi', 'sse_starlette', 'uvicorn') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
