"""The README's code runs as written, in a project that is not this repository.

Every ```python block in README.md is preceded by an HTML comment that says how the
block is exercised (the README explains the convention to readers):

- `<!-- test: save NAME.py -->`        the block is a module that later blocks import;
- `<!-- test: background NAME.py -->`  saved, then started as a process (a service) that
                                       later blocks talk to; stopped with SIGTERM at the end;
- `<!-- test: run -->`                 a script, run to completion (exit 0);
- `<!-- test: pytest -->`              a test file, run by pytest in that project.

Each block runs in a fresh temporary directory holding only the files earlier blocks
saved: no pyproject settings of this repository (so no `asyncio_mode`), only the
installed package, against a real nats-server given by `NATS_URL`.

Every shell block (```bash, ```sh, ```shell, ```console) has one of:

- `<!-- test: bash NAME -->`     run as written by `bash -e` (a failing command fails
                                 the block) in `test_bash_NAME` below, which provides
                                 what the block needs (servers, free ports) and checks
                                 what it does; the test ends every process the block
                                 started, whatever happens;
- `<!-- test: skip (REASON) -->` only for the set-up block at the top of the README
                                 (`.ci/run` runs those steps on a fresh machine).

A shell block without a directive, naming a test that does not exist, or skipped
anywhere else fails `test_every_shell_block_says_how_it_is_tested`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
from support.cli import ROOT, Running, alive, children
from support.shop import place, revenue_of

from framework import Client, connect
from framework.cli.web import DEFAULT_PORT
from framework.testing import eventually
from services.contracts import DailyRevenue

README = ROOT / "README.md"
BLOCK = re.compile(
    r"(?:<!--\s*test:\s*(?P<directive>[^>]*?)\s*-->\s*\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)```",
    re.S,
)
ACTIONS = {"save", "background", "run", "pytest"}
SHELLS = {"bash", "sh", "shell", "console"}
REASON = re.compile(r"\(\S.*\)")  # `skip (why)`


@dataclass(frozen=True)
class Block:
    line: int
    action: str
    argument: str
    code: str
    lang: str = "python"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced block of `text`, with the directive above it (if any)."""
    blocks = []
    for match in BLOCK.finditer(text):
        action, _, argument = (match.group("directive") or "").partition(" ")
        line = text.count("\n", 0, match.start("code"))
        code, lang = match.group("code"), match.group("lang")
        blocks.append(Block(line, action, argument.strip(), code, lang))
    return blocks


def python_blocks(text: str) -> list[Block]:
    return [block for block in fenced_blocks(text) if block.lang == "python"]


def shell_blocks(text: str) -> list[Block]:
    return [block for block in fenced_blocks(text) if block.lang in SHELLS]


def test_every_python_block_says_how_it_is_tested() -> None:
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has python blocks"
    untested = [f"README.md:{b.line}" for b in blocks if b.action not in ACTIONS]
    assert untested == [], "python blocks without a `<!-- test: ... -->` directive"


def test_the_block_parser_reads_directives() -> None:
    text = (
        "x\n<!-- test: save a.py -->\n```python\nA = 1\n```\n```bash\nls\n```\n```python\nB\n```\n"
    )
    blocks = python_blocks(text)
    assert [(b.action, b.argument, b.code) for b in blocks] == [
        ("save", "a.py", "A = 1\n"),
        ("", "", "B\n"),
    ]


def bash_tests() -> set[str]:
    """The NAMEs a `bash NAME` directive may give: this module's `test_bash_NAME`."""
    return {name.removeprefix("test_bash_") for name in globals() if name.startswith("test_bash_")}


def _shell_problem(block: Block, first: Block) -> str | None:
    where = f"README.md:{block.line}"
    if block.action == "bash":
        if block.argument in bash_tests():
            return None
        return f"{where}: `bash {block.argument}` names no test_bash_{block.argument}"
    if block.action == "skip":
        if block == first and REASON.fullmatch(block.argument):
            return None
        return f"{where}: only the set-up block at the top is skipped, with (a reason)"
    return f"{where}: a {block.lang} block without `<!-- test: bash NAME -->`"


def shell_block_problems(text: str) -> list[str]:
    """What lets a shell block of `text` escape its test (one line each); [] if none."""
    first = fenced_blocks(text)[0]
    shells = shell_blocks(text)
    problems = [p for block in shells if (p := _shell_problem(block, first)) is not None]
    named = Counter(block.argument for block in shells if block.action == "bash")
    problems += [
        f"test_bash_{name} needs one block with `bash {name}`, found {named[name]}"
        for name in sorted(bash_tests())
        if named[name] != 1
    ]
    return problems


def test_every_shell_block_says_how_it_is_tested() -> None:
    assert shell_blocks(README.read_text()), "the README has shell blocks"
    assert shell_block_problems(README.read_text()) == []


def test_the_shell_block_check_finds_blocks_that_escape() -> None:
    top = "<!-- test: skip (set-up) -->\n```bash\npip\n```\n"
    tested = "".join(f"<!-- test: bash {name} -->\n```bash\nx\n```\n" for name in bash_tests())
    assert shell_block_problems(top + tested) == []
    escaping = (
        "```python\nA\n```\n"
        f"{top}```sh\nls\n```\n<!-- test: bash nosuch -->\n```console\nls\n```\n"
        "<!-- test: skip -->\n```shell\nls\n```\n<!-- test: bash replay -->\n```bash\nx\n```\n"
        "<!-- test: bash replay -->\n```bash\nx\n```\n"
    )
    assert shell_block_problems(escaping) == [
        "README.md:5: only the set-up block at the top is skipped, with (a reason)",
        "README.md:8: a sh block without `<!-- test: bash NAME -->`",
        "README.md:12: `bash nosuch` names no test_bash_nosuch",
        "README.md:16: only the set-up block at the top is skipped, with (a reason)",
        *[
            f"test_bash_{name} needs one block with `bash {name}`, found {2 * (name == 'replay')}"
            for name in sorted(bash_tests())
        ],
    ]


def _env(nats_url: str, project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NATS_"))}
    env.update(NATS_URL=nats_url, PYTHONPATH=str(project), LOG_LEVEL="WARNING")
    return env


def _wait_started(process: subprocess.Popen[str], log: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        if "service started" in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not start:\n{log.read_text()}")


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            assert process.wait(timeout=15) == 0, "a README service did not stop cleanly"
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _run(args: list[str], project: Path, env: dict[str, str], where: str) -> None:
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{where} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _start(block: Block, project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    log = project / f"{block.argument}.log"
    env = {**env, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, block.argument],
            cwd=project,
            env=env,
            stdout=out,
            stderr=out,
            text=True,
        )
    _wait_started(process, log, f"README.md:{block.line} ({block.argument})")
    return process


def test_readme_blocks_run_as_written(
    nats_url: str, tmp_path: Path, background: list[subprocess.Popen[str]]
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = _env(nats_url, project)
    for number, block in enumerate(python_blocks(README.read_text())):
        where = f"README.md:{block.line}"
        if block.action in ("save", "background"):
            (project / block.argument).write_text(block.code)
        if block.action == "background":
            background.append(_start(block, project, env))
        elif block.action == "run":
            script = project / f"block_{number}.py"
            script.write_text(block.code)
            _run([sys.executable, script.name], project, env, where)
        elif block.action == "pytest":
            test_file = project / f"test_block_{number}.py"
            test_file.write_text(block.code)
            _run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file.name],
                project,
                env,
                where,
            )


# --- shell blocks -----------------------------------------------------------------------

BIN = str(Path(sys.executable).parent)  # this environment's `mesh` and `nats-server`


def readme_shell_block(name: str) -> Block:
    """The README's block marked `<!-- test: bash NAME -->`."""
    blocks = shell_blocks(README.read_text())
    [block] = [b for b in blocks if (b.action, b.argument) == ("bash", name)]
    return block


def shell_env(**extra: str) -> dict[str, str]:
    """What a user has after `. .venv/bin/activate`: this environment's commands first on
    PATH, and none of the test run's NATS or mesh settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "NATS_", "MESH_"))}
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return {**env, **extra}


@contextmanager
def bash_block(name: str, cwd: Path, env: dict[str, str], scripts: Path) -> Iterator[Running]:
    """The block run as written by `bash -e` in `cwd`, in a process group of its own
    that is ended (SIGTERM, then SIGKILL) on the way out, whatever happened."""
    script = scripts / f"readme-{name}.sh"
    script.write_text(readme_shell_block(name).code)
    running = Running(["bash", "-e", str(script)], cwd, env, new_session=True)
    try:
        yield running
    finally:
        running.stop_group()


def skip_unless_free(port: int, what: str) -> None:
    """Skip (saying why) when 127.0.0.1:`port`, which the README's block uses as written,
    is taken: the test must never talk to a server it did not start."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            pytest.skip(f"127.0.0.1:{port} is taken; {what} uses it as written")


def _still_running(script: Running, waiting_for: str) -> None:
    """Fail (or skip, if a port was taken meanwhile) when bash has ended early."""
    if script.proc.poll() is None:
        return
    if "address already in use" in script.output():
        pytest.skip(f"a port of the README's block was taken while it started:\n{script.output()}")
    raise AssertionError(
        f"bash ended ({script.proc.returncode}) before {waiting_for}:\n{script.output()}"
    )


def _dashboards(block: Block) -> list[tuple[str, str]]:
    """(command, URL) of each `mesh dashboard` line of the block, loopback only."""
    served = []
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[:2] == ["mesh", "dashboard"], line
        options = dict(zip(words[2::2], words[3::2], strict=True))
        host = options.get("--host", "127.0.0.1")
        assert host == "127.0.0.1", f"a test binds loopback only, not {host}: {line}"
        served.append((line, f"http://{host}:{options.get('--port', DEFAULT_PORT)}/"))
    return served


async def _serves_the_page(script: Running, url: str) -> bool:
    _still_running(script, f"{url} answered")
    try:
        async with httpx.AsyncClient() as http:
            page = await http.get(url, timeout=2)
    except httpx.TransportError:
        return False
    assert page.status_code == 200 and "<title>mesh dashboard</title>" in page.text, page.text
    return True


def _child(script: Running, command: str) -> int | None:
    found = [pid for pid, line in children(script.proc.pid).items() if command in line]
    return found[0] if found else None


async def test_bash_dashboard(nats_url: str, tmp_path: Path) -> None:
    """Each line serves the dashboard at the URL its start line names (GET / is the
    page) until a signal stops it; it then exits 0 (`bash -e` goes on to the next). The
    start lines are all a user sees: no debug lines, no "Terminated"."""
    served = _dashboards(readme_shell_block("dashboard"))
    assert served[0][1] == f"http://127.0.0.1:{DEFAULT_PORT}/"  # the default, as documented
    for _, url in served:
        skip_unless_free(urlsplit(url).port or 0, "the README's `mesh dashboard` block")
    with bash_block("dashboard", tmp_path, shell_env(NATS_URL=nats_url), tmp_path) as script:
        for number, (line, url) in enumerate(served):
            stop_with = (signal.SIGINT, signal.SIGTERM)[number % 2]  # Ctrl-C, then SIGTERM
            await _serve_then_stop(script, line, url, stop_with)
        ended = await eventually(lambda: script.proc.poll() is not None, 30, "bash to end")
        assert ended and script.proc.returncode == 0, script.output()
    said = [line.split(" (bound to")[0] for line in script.lines]  # and nothing else
    assert said == [f"mesh dashboard: {url}" for _, url in served], script.output()


async def _serve_then_stop(script: Running, line: str, url: str, stop_with: int) -> None:
    """`line` (the command bash runs now) names `url`, serves the page there, stops on
    `stop_with`; its exit status is bash's to judge (`-e`)."""
    start = f"mesh dashboard: {url} (bound to 127.0.0.1: this machine only"

    def started() -> bool:
        _still_running(script, f"`{line}` started")
        return script.said(start)

    await eventually(started, 30, lambda: f"`{line}` to start:\n{script.output()}")
    await eventually(lambda: _serves_the_page(script, url), 30, f"GET {url}")
    pid = await eventually(lambda: _child(script, "dashboard"), 10, f"the process of `{line}`")
    os.kill(pid, stop_with)
    await eventually(lambda: not alive(pid), 30, f"`{line}` to stop")


CLUSTER = ROOT / "nats-cluster"


def cluster_ports() -> list[int]:
    """Every port the `nats-cluster/` nodes listen on (clients and routes), loopback only."""
    listens = re.findall(
        r"^\s*listen:\s*(\S+)\s*$",
        "".join(conf.read_text() for conf in sorted(CLUSTER.glob("*.conf"))),
        re.M,
    )
    assert listens and all(address.startswith("127.0.0.1:") for address in listens), listens
    return [int(address.rsplit(":", 1)[1]) for address in listens]


async def _replicated(client: Client, replicas: int) -> list[str] | None:
    """The streams (key-value buckets included) once every one has `replicas` current
    replicas; None before."""
    streams = await client.js.streams_info()
    for info in streams:
        assert info.config.num_replicas == replicas, (info.config.name, info.config.num_replicas)
        peers = info.cluster.replicas if info.cluster else None
        if not peers or len(peers) != replicas - 1 or not all(p.current for p in peers):
            return None
    return sorted(info.config.name for info in streams)


async def test_bash_cluster(tmp_path: Path) -> None:
    """The three nodes of `nats-cluster/` start, the service runs against them and its
    streams get three replicas. The block runs in a directory holding a copy of
    `nats-cluster/` (the nodes keep their stores under the working directory)."""
    block = readme_shell_block("cluster")
    url = re.findall(r"^export NATS_URL=(\S+)", block.code, re.M)[-1]
    assert {urlsplit(u).hostname for u in url.split(",")} == {"127.0.0.1"}, url
    for port in cluster_ports():
        skip_unless_free(port, "the README's cluster (nats-cluster/)")
    checkout = tmp_path / "checkout"
    shutil.copytree(CLUSTER, checkout / "nats-cluster")
    with bash_block("cluster", checkout, shell_env(), tmp_path) as script:

        def nodes_ready() -> bool:
            _still_running(script, "three nodes were ready")
            return script.count("Server is ready") == 3

        await eventually(nodes_ready, 60, lambda: f"three nodes:\n{script.output()}")
        async with connect(url) as client:

            async def orders_answer() -> bool:
                _still_running(script, "orders answered $SRV.PING")
                return bool(await client.ping("orders"))

            await eventually(orders_answer, 60, lambda: f"orders:\n{script.output()}")
            streams = await eventually(lambda: _replicated(client, 3), 60, "replicated streams")
            assert "EVENTS_ORDER" in streams, streams
        assert script.proc.poll() is None, script.output()  # still serving


async def test_bash_replay(client: Client, shop: None, nats_url: str, tmp_path: Path) -> None:
    """Against the running orders service (read model v1): the replay folds the whole
    stream into v2, says so and stops; the call then answers v2's revenue, which is v1's."""
    for cents in (1_000, 2_500):
        await place(client, "readme", cents)

    async def v1_counted() -> list[DailyRevenue] | None:
        revenue = await revenue_of(client)
        return revenue if sum(day.orders for day in revenue) == 2 else None

    v1 = await eventually(v1_counted, 30, "the orders in read model v1")
    with bash_block("replay", ROOT, shell_env(NATS_URL=nats_url), tmp_path) as script:
        await eventually(lambda: script.proc.poll() is not None, 120, "the replay and the call")
    output = script.output()
    assert script.proc.returncode == 0, output
    assert "view_v2_created: 2 deliveries, caught up" in output, output
    assert "view_v2_confirmed: 2 deliveries, caught up" in output, output
    reply = output[output.index("\n[", output.index("\nreplayed in")) + 1 :]  # `mesh call`'s
    assert msgspec.json.decode(reply, type=list[DailyRevenue]) == v1, output
    assert sum(day.revenue_cents for day in v1) == 3_500
