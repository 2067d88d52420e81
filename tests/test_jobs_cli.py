"""`mesh jobs ...` against a real server: in-process through `main(argv)` (in a thread,
it runs a loop of its own) and, for the progress display, as the installed script in a
pseudo-terminal and in a pipe."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
from typing import Any

import anyio
import msgspec
import pytest
from support.cli import mesh, mesh_command

from framework import JobContext, Service
from framework.cli.main import ExitCode


class Render(msgspec.Struct):
    pages: int


def reports(*, broken: list[bool] | None = None) -> Service:
    service = Service("reports")

    @service.job("render", max_attempts=1)
    async def render(req: Render, job: JobContext) -> dict[str, Any]:
        if broken and broken[0]:
            raise RuntimeError("printer on fire")
        for page in range(req.pages):
            await job.progress((page + 1) / req.pages, f"page {page + 1} of {req.pages}")
            await anyio.sleep(0.25)
        return {"url": f"/r/{job.job_id}.pdf"}

    return service


async def test_enqueue_wait_show_ls(serve, nats_url, capsys):
    await serve(reports())
    code = await mesh("jobs", "enqueue", "reports.render", '{"pages": 2}', "--id", "r-1",
                      "--wait", "--url", nats_url)  # fmt: skip
    out, err = capsys.readouterr()
    assert code == ExitCode.OK
    assert json.loads(out) == {"url": "/r/r-1.pdf"}
    assert "reports.render/r-1" in err and "succeeded 100%" in err  # plain lines: no terminal
    assert await mesh("jobs", "show", "reports.render", "r-1", "--url", nats_url) == 0
    out, _ = capsys.readouterr()
    assert "State:       succeeded" in out and '"pages": 2' in out
    assert await mesh("jobs", "enqueue", "reports.render", '{"pages": 1}', "--url", nats_url) == 0
    new_id = capsys.readouterr().out.strip()
    assert await mesh("jobs", "ls", "reports.render", "--json", "--url", nats_url) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {job["id"] for job in listed} == {"r-1", new_id}
    assert await mesh("jobs", "ls", "--state", "succeeded", "--url", nats_url) == 0
    table = capsys.readouterr().out
    assert table.startswith("KIND") and "r-1" in table


async def test_errors_map_to_exit_codes(serve, nats_url, capsys):
    broken = [True]
    await serve(reports(broken=broken))
    code = await mesh("jobs", "enqueue", "reports.render", '{"pages": "x"}', "--url", nats_url)
    assert code == ExitCode.BAD_REQUEST
    assert "data.pages must be integer" in capsys.readouterr().err
    code = await mesh("jobs", "enqueue", "reports.render", '{"pages": 1}', "--id", "f-1",
                      "--wait", "--url", nats_url)  # fmt: skip
    assert code == ExitCode.SERVICE_ERROR
    assert "printer on fire" in capsys.readouterr().err
    assert await mesh("jobs", "show", "reports.render", "nope", "--url", nats_url) == 3
    assert await mesh("jobs", "enqueue", "bad kind", "--url", nats_url) == ExitCode.USAGE
    broken[0] = False
    assert await mesh("jobs", "retry", "reports.render", "f-1", "--url", nats_url) == 0
    assert "queued reports.render/f-1 again" in capsys.readouterr().out


async def test_cancel_and_schedules(serve, client, nats_url, capsys):
    await client.enqueue("reports.render", Render(1), job_id="c-1")  # no worker yet
    assert await mesh("jobs", "cancel", "reports.render", "c-1", "--url", nats_url) == 0
    assert "cancelled reports.render/c-1" in capsys.readouterr().out
    assert await mesh("jobs", "cancel", "reports.render", "c-1", "--url", nats_url) == 0
    assert "already cancelled: nothing to cancel" in capsys.readouterr().out
    await client.schedule("reports.render", Render(1), cron="0 0 * * *", name="nightly")
    assert await mesh("jobs", "schedules", "--url", nats_url) == 0
    out = capsys.readouterr().out
    assert "nightly" in out and "0 0 0 * * *" in out
    assert await mesh("jobs", "unschedule", "reports.render", "nightly", "--url", nats_url) == 0
    assert await mesh("jobs", "unschedule", "reports.render", "nightly", "--url", nats_url) == 3
    assert await mesh("jobs", "schedules", "--url", nats_url) == 0
    assert "no schedules" in capsys.readouterr().err


def _run_in_terminal(argv: list[str]) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a pseudo-terminal; its exit code and output."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(argv, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return proc.wait(30), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(not hasattr(pty, "openpty"), reason="needs a pseudo-terminal")
async def test_wait_shows_a_progress_bar_in_a_terminal(serve, nats_url):
    await serve(reports())
    argv = [*mesh_command(), "jobs", "enqueue", "reports.render", '{"pages": 4}', "--wait",
            "--url", nats_url]  # fmt: skip
    code, output = await anyio.to_thread.run_sync(_run_in_terminal, argv)
    assert code == 0, output
    assert "\r" in output and "█" in output  # a tqdm bar, redrawn in place
    assert "100%" in output and '"url"' in output
    piped = await anyio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30)
    )
    assert piped.returncode == 0
    assert "\r" not in piped.stderr and "running" in piped.stderr
    assert json.loads(piped.stdout)["url"].endswith(".pdf")
