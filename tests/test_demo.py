"""`just demo` (`python -m services.demo`) against the mesh as `just up` starts it.

The mesh is `mesh up` with this repository's `[tool.mesh]` services (the gateway and the
dashboard on free ports); the demo runs as a user runs it, in the project directory with
only `NATS_URL` set, so it has to find the gateway the mesh announces. Its output must
show every basket's final state with the reason, one order's event stream ending in a
final state, and that order's trace across the services; and its exit code must say so
when orders do not become final (payments stopped with SIGSTOP).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_shop_e2e import Mesh

from framework.dev.devserver import free_port
from framework.testing import eventually
from services.demo import BASKETS
from services.inventory import SEED_CATALOG
from services.payments import DECLINE_ABOVE_CENTS

ORDER_LINE = re.compile(r"^(ord-\w+)\s+(\S+)\s+([\d.]+)\s+(pending|confirmed|cancelled|refunded)")
SPAN_LINE = re.compile(r"\s(INTERNAL|SERVER|CLIENT|PRODUCER|CONSUMER)\s+(\S+)\s")
EXPECTED = {  # customer -> final state and what its reason says
    "alice-0": ("confirmed", ""),
    "bob-1": ("confirmed", ""),
    "carol-2": ("cancelled", "above the limit"),
    "dave-3": ("confirmed", ""),
    "erin-4": ("cancelled", "out of stock: kite-red"),
    "frank-5": ("cancelled", "out of stock: kite-red"),
}


def demo(workdir: Path, nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m services.demo` in the project directory, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "DASHBOARD_"))}
    env.pop("MESH_TRACE_FILE", None)  # the demo finds .mesh/traces.jsonl where it runs
    return subprocess.run(
        [sys.executable, "-m", "services.demo", *args],
        cwd=workdir,
        env={**env, "NATS_URL": nats_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def section(lines: list[str], starts: str) -> list[str]:
    """The lines after the one starting with `starts`, up to the next blank line."""
    first = next(i for i, line in enumerate(lines) if line.startswith(starts)) + 1
    end = next((i for i in range(first, len(lines)) if not lines[i].strip()), len(lines))
    return lines[first:end]


def test_the_baskets_buy_from_the_seed_catalog() -> None:
    """Every SKU exists; some orders are bound to be declined, some to find no stock."""
    skus = [sku for _, lines in BASKETS for sku, _, _ in lines]
    assert set(skus) <= set(SEED_CATALOG), set(skus) - set(SEED_CATALOG)
    totals = [sum(q * price for _, q, price in lines) for _, lines in BASKETS]
    assert any(total > DECLINE_ABOVE_CENTS for total in totals)
    short = [
        customer
        for customer, lines in BASKETS
        if any(q > SEED_CATALOG[sku][1] for sku, q, _ in lines)
    ]
    assert short and len(short) < len(BASKETS)


def test_demo_says_when_there_is_no_gateway(tmp_path: Path) -> None:
    """No mesh: the gateway is where `just up` would put it (GATEWAY_PORT), and not there."""
    gateway_port = free_port()
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    env["GATEWAY_PORT"] = str(gateway_port)
    done = subprocess.run(
        [sys.executable, "-m", "services.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    where = f"http://127.0.0.1:{gateway_port}"
    assert done.stdout.startswith(f"shop gateway: {where} (the default of `just up`)")
    assert f"demo: {where}: ConnectError" in done.stderr and "`just up`" in done.stderr


@pytest.mark.slow
async def test_demo_orders_through_the_gateway(tmp_path: Path) -> None:
    port, gateway_port, dashboard_port = free_port(), free_port(), free_port()
    env = {
        "GATEWAY_PORT": str(gateway_port),
        "DASHBOARD_PORT": str(dashboard_port),
        "ORDER_TIMEOUT": "120",  # no deadline while payments is stopped below
    }
    mesh = Mesh(tmp_path, port, env)
    url = f"nats://127.0.0.1:{port}"
    try:
        await eventually(lambda: mesh.said("mesh: ready"), 90, "mesh ready")
        done = demo(tmp_path, url)
        assert done.returncode == 0, done.stdout + done.stderr
        check_output(done.stdout.splitlines(), gateway_port, dashboard_port)
        payments = mesh.child("services.payments:service")[0]
        os.kill(payments, signal.SIGSTOP)  # nothing gets paid: no order becomes final
        try:
            stuck = demo(tmp_path, url, "--orders", "2", "--wait", "3")
        finally:
            os.kill(payments, signal.SIGCONT)
        assert stuck.returncode == 1, stuck.stdout + stuck.stderr
        assert "2 order(s) not final after 3 s" in stuck.stderr
        states = [m[4] for line in stuck.stdout.splitlines() if (m := ORDER_LINE.match(line))]
        assert states == ["pending", "pending"], stuck.stdout
    finally:
        code = mesh.stop()
        assert mesh.said("mesh: stopped"), "".join(mesh.lines[-40:])
    assert code == 0


def check_output(lines: list[str], gateway_port: int, dashboard_port: int) -> None:
    text = "\n".join(lines)
    assert (
        lines[0]
        == f"shop gateway: http://127.0.0.1:{gateway_port} (announced by the running gateway)"
    )
    # every order final, with the reason it was cancelled
    finals = {m[2]: line for line in lines if (m := ORDER_LINE.match(line))}
    assert set(finals) == set(EXPECTED), text
    for customer, (status, reason) in EXPECTED.items():
        assert f" {status}" in finals[customer] and reason in finals[customer], finals[customer]
    # the first order's event stream, as it arrived: the order, its events, a final state, end
    stream = section(lines, "GET /orders/")
    events = [line.split("event: ", 1)[1] for line in stream if "event: " in line]
    data = [line.split("data: ", 1)[1] for line in stream if "data: " in line]
    assert events[0] == "order" and events[-1] == "end" and len(data) == len(events), text
    last = events[-2]
    assert last in ("order.confirmed.v1", "order.cancelled.v1") or (
        last == "order" and re.search(r'"status":"(confirmed|cancelled)"', data[-2])
    ), stream
    # the trace of that order: one tree from the demo through the gateway to every service
    trace = section(lines, "the trace of ")
    assert re.match(r"trace [0-9a-f]{32}  \(\d+ spans", trace[0]), trace
    assert "demo order 1" in trace[1] and "POST /orders" in trace[2], trace
    services = {m[2] for line in trace[1:] if (m := SPAN_LINE.search(line))}
    assert {"demo", "gateway", "orders", "payments", "inventory", "notifications"} <= services
    assert lines[-1] == f"dashboard: http://127.0.0.1:{dashboard_port}"
