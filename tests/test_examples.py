"""Every example runs to completion against a fresh server and shows what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# example -> lines its output must contain
EXPECTED: dict[str, list[str]] = {
    "hello_rpc.py": ["Hello, world! (served by greeter)"],
    "typed_errors.py": [
        "accounts.get GetAccount(account_id=1): ok, owner ada",
        "NotFound 404: no account 404",
        "BadRequest 400: invalid request",
        "ServiceError 409: account 2 is being migrated",
        "RemoteError 500: internal error in accounts.get (error id",
        "NotFound 404: accounts has no endpoint accounts.delete",
        "NoResponders 503",
    ],
    "events_fanout.py": ["each service got all 3 events"],
    "idempotent_consumer.py": [
        "first publish: stored as #1, duplicate=False",
        "retry at once: stored as #1, duplicate=True",
        "retry after the window: stored as #2, duplicate=False",
        "duplicate skipped; balance 50 (awarded once)",
    ],
    "retries_and_dead_letters.py": [
        "attempt 3 failed, printer offline",
        "(max_deliver): ConnectionError: printer offline",
        "(rejected): negative amount",
        "printed on attempt 1",
        "replayed dead letter handled",
    ],
    "background_jobs.py": [
        "running    50% page 2 of 4",
        "succeeded 100% page 4 of 4",
        "same id while it exists unfinished -> the same job: True",
        "delayed job is scheduled; cancelled: True",
        "schedule fired every second, then stopped: True",
        "failed after 2 attempts: ConnectionError: mail server down (attempt 2)",
    ],
    "tracing_console.py": ["one correlation id across 3 handlers: True"],
    "plain_script_client.py": [
        "is confirmed",
        "is cancelled (amount 500000 cents is above the limit of 100000 cents)",
        "rejected: BadRequest 400",
    ],
}


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, nats_url: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "MESH_OUTBOX": str(tmp_path / "outbox.jsonl"),
        "MESH_TRACE_CONSOLE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for line in EXPECTED[name]:
        assert line in done.stdout, f"{line!r} not in:\n{done.stdout}"
    if name == "tracing_console.py" and "tracing skipped" not in done.stdout:
        assert "one trace across 3 handlers" in done.stdout, done.stdout
