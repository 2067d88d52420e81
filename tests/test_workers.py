"""`mesh run --workers N`: N supervised processes of the same services.

Both workers serve (calls answered by two instance ids, events shared through one
durable consumer), a SIGKILLed worker is restarted, SIGTERM stops every worker
gracefully (an in-flight call still gets its answer), and a worker that crashes at once
is restarted with growing delays instead of in a tight loop.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import anyio
import pytest
from support.cli import MESH_MODULE, Running, alive, project_env

from framework import connect
from framework.cli.main import ExitCode, main
from framework.cli.services import workers
from framework.runner import Backoff, Child, supervise
from framework.testing import eventually

WORKER_APP = textwrap.dedent(
    """
    import os

    import anyio
    import msgspec
    from framework import Service

    class Job(msgspec.Struct):
        n: int

    svc = Service("workersample", version="1.0.0")

    @svc.rpc()
    async def whoami() -> dict[str, object]:
        return {"id": svc.instance_id, "pid": os.getpid()}

    @svc.rpc()
    async def slow() -> dict[str, object]:
        await anyio.sleep(1.5)
        return {"id": svc.instance_id, "done": True}

    @svc.subscribe("work.item.v1", max_concurrency=4)
    async def on_item(event: Job) -> None:
        with open(os.environ["HANDLED_FILE"], "a") as out:
            out.write(f"{event.n} {os.getpid()}\\n")
    """
)


WORKER_ARGS = ("--workers", "2", "--grace", "5")


async def _instances(client) -> dict[str, int]:
    """Instance id -> pid of every running workersample, asked through the service itself."""
    pings = await client.ping("workersample", timeout=0.3)
    found: dict[str, int] = {}
    for _ in range(40):  # the queue group spreads calls at random: ask until each answered
        answer = await client.call("workersample.whoami", timeout=5)
        found[answer["id"]] = answer["pid"]
        if {p.id for p in pings} <= set(found):
            break
    return {i: pid for i, pid in found.items() if i in {p.id for p in pings}}


async def test_two_workers_share_the_work_restart_and_stop_gracefully(tmp_path, nats_url):
    (tmp_path / "workerapp.py").write_text(WORKER_APP)
    handled = tmp_path / "handled.txt"
    env = project_env(NATS_URL=nats_url, HANDLED_FILE=str(handled))
    run = Running([*MESH_MODULE, "run", "workerapp:svc", *WORKER_ARGS], tmp_path, env)
    try:
        async with connect(nats_url) as client:

            async def two_instances() -> bool:
                return len(await client.ping("workersample", timeout=0.3)) == 2

            await eventually(two_instances, 30, "two workers")
            answered = await _instances(client)
            assert len(answered) == 2 and len(set(answered.values())) == 2, answered
            first_pids = set(answered.values())

            # events: one durable consumer, each event handled once, by the workers
            for n in range(60):
                await client.publish("work.item.v1", {"n": n})
            await eventually(
                lambda: handled.exists() and len(handled.read_text().splitlines()) >= 60,
                30,
                "every event handled",
            )
            rows = [line.split() for line in handled.read_text().splitlines()]
            assert sorted(int(n) for n, _ in rows) == list(range(60))
            assert {int(pid) for _, pid in rows} <= first_pids
            info = await client.info("workersample", timeout=0.5)
            meta = [e.metadata for i in info for e in i.endpoints if e.name == "on_item"]
            assert len(meta) == 2 and len({(m["stream"], m["consumer"]) for m in meta}) == 1
            consumers = await client.js.consumers_info(meta[0]["stream"])
            assert [c.name for c in consumers] == [meta[0]["consumer"]]  # one, shared

            # a SIGKILLed worker is restarted, and the new one serves
            victim = sorted(first_pids)[0]
            os.kill(victim, signal.SIGKILL)
            await eventually(lambda: run.said("exited with code -9; restarting it in"), 15, "")
            await eventually(two_instances, 30, "the worker back")
            again = await _instances(client)
            assert len(again) == 2 and victim not in again.values(), again
            workers_now = set(again.values())

            # SIGTERM: every worker stops gracefully; an in-flight call still gets its answer
            async with anyio.create_task_group() as task_group:
                replies: list[dict[str, object]] = []

                async def slow_call() -> None:
                    replies.append(await client.call("workersample.slow", timeout=10))

                task_group.start_soon(slow_call)
                await anyio.sleep(0.5)
                run.proc.send_signal(signal.SIGTERM)
            assert replies and replies[0]["done"] is True
        code = await anyio.to_thread.run_sync(lambda: run.proc.wait(timeout=30))
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    output = run.output()
    assert code == 0, output
    assert "mesh: SIGTERM: stopping worker 1, worker 2" in output
    assert "mesh: stopped" in output and "Traceback" not in output
    assert output.count("service stopped") >= 2  # each worker drained and said so
    assert not [pid for pid in workers_now if alive(pid)]


async def test_a_crash_loop_backs_off(tmp_path):
    """A worker that dies at once is restarted after 0.2, 0.4, 0.8, 0.8 ... seconds."""
    out = tmp_path / "supervisor.log"
    with out.open("w") as log:
        child = Child(
            "crasher",
            [sys.executable, "-c", "raise SystemExit(3)"],
            env=dict(os.environ),
            out=log,
            backoff=Backoff(first=0.2, limit=0.8, stable=10),
        )
        with anyio.move_on_after(2.5):
            await child.keep_running()
    text = out.read_text()
    delays = [line.rsplit(" in ", 1)[1] for line in text.splitlines() if "restarting" in line]
    assert delays[:4] == ["0.2 s", "0.4 s", "0.8 s", "0.8 s"], text
    assert 3 <= child.starts <= 6, text  # without the backoff: dozens in 2.5 s
    assert "crasher exited with code 3" in text
    assert child.process is not None and child.process.returncode is not None


def test_backoff_doubles_up_to_the_limit():
    backoff = Backoff(first=0.5, limit=30, stable=10)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_workers_argument(capsys):
    assert workers("auto") == (os.cpu_count() or 1)
    assert workers("3") == 3
    assert main(["run", "x:y", "--workers", "0"]) == ExitCode.USAGE
    assert main(["run", "x:y", "--workers", "many"]) == ExitCode.USAGE
    assert "--workers" in capsys.readouterr().err


async def test_supervise_stops_children_on_sigterm(tmp_path):
    """The supervisor's own contract: a signal stops every child (SIGTERM, then SIGKILL)."""
    log = (tmp_path / "out.log").open("w")
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    children = [
        Child("polite", [sys.executable, "-c", "import time; time.sleep(60)"], env={}, out=log),
        Child("stubborn", [sys.executable, "-c", stubborn], env={}, out=log),
    ]

    async def send_sigterm_soon() -> None:
        await eventually(lambda: all(c.process is not None for c in children), 10, "started")
        await anyio.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(send_sigterm_soon)
            assert await supervise(children, grace=0.5, out=log) == "SIGTERM"
    log.close()
    for child in children:
        assert child.process is not None and child.process.returncode is not None
    assert children[0].process.returncode == -signal.SIGTERM
    assert children[1].process.returncode == -signal.SIGKILL  # ignored SIGTERM: killed


@pytest.mark.parametrize("count", ["2"])
def test_workers_refuse_a_spec_that_does_not_load_before_starting(tmp_path, count, capsys):
    assert main(["run", "no_such_module_xyz:svc", "--workers", count]) == ExitCode.USAGE
    assert "No module named 'no_such_module_xyz'" in capsys.readouterr().err
