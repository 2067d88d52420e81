"""The local mesh end to end, started the way `just up` starts it (real processes).

50 orders, some declined; the payments process is killed with SIGKILL mid-stream and
restarted by the supervisor. Every order must reach its final state, every customer be
notified exactly once, and no order be charged twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import anyio
import pytest
from support.cli import MESH_MODULE, Running, alive, children, mesh_cli

from framework import connect
from framework.dev.devserver import free_port
from framework.testing import eventually as _until
from services.contracts import CreateOrder, GetOrder, Order, OrderItem

pytestmark = pytest.mark.slow

# the shop's services this test is about (the whole `[tool.mesh]` set, receipts and the
# HTTP processes too, runs in tests/test_shop_e2e.py); its workdir says so in a mesh.toml
SAMPLE_MESH_TOML = """\
services = [
    "services.orders:service",
    "services.payments:service",
    "services.inventory:service",
    "services.notifications:service",
]
nats_config = "nats.conf"
"""

ORDERS = 50
DECLINED_EVERY = 5  # every fifth order is above the provider's limit


class MeshProcess(Running):
    """`mesh up` of the shop's saga services in `workdir`, on `port`."""

    def __init__(self, workdir: Path, port: int) -> None:
        config = workdir / "nats.conf"
        config.write_text('listen: 127.0.0.1:4222\njetstream { store_dir: ".mesh/jetstream" }\n')
        (workdir / "mesh.toml").write_text(SAMPLE_MESH_TOML)
        self.outbox = workdir / "outbox.jsonl"
        self.ledger = workdir / "ledger.jsonl"
        env = {
            **os.environ,
            "MESH_OUTBOX": str(self.outbox),
            # the shop's saga deadline (30 s) would race the redelivery of what the
            # killed payments had taken (ack_wait 30 s): this test is about that redelivery
            "ORDER_TIMEOUT": "120",
            "PAYMENTS_LEDGER": str(self.ledger),
            "LOG_FORMAT": "json",
        }
        argv = [*MESH_MODULE, "up", "--port", str(port), "--no-color", "--config", str(config)]
        super().__init__(argv, workdir, env)

    def child(self, name: str) -> int:
        for pid, cmdline in children(self.proc.pid).items():
            if f"services.{name}:service" in cmdline:
                return pid
        raise LookupError(f"no {name} process")


def _request(n: int) -> CreateOrder:
    price = 250_000 if n % DECLINED_EVERY == 0 else 1_000 + n
    return CreateOrder(customer_id=f"cust-{n}", items=[OrderItem("book-dune", 1, price)])


async def test_mesh_end_to_end_with_payments_killed_mid_stream(tmp_path: Path):
    port = free_port()
    mesh = MeshProcess(tmp_path, port)
    url = f"nats://127.0.0.1:{port}"
    try:
        await _until(lambda: mesh.said("mesh: ready"), 60, "mesh ready")
        placed: list[Order] = []
        async with connect(url) as client:
            for n in range(ORDERS):
                if n == ORDERS // 2:
                    os.kill(mesh.child("payments"), signal.SIGKILL)
                placed.append(
                    await client.call("orders.create", _request(n), returns=Order, timeout=10)
                )
            await _until(lambda: mesh.said("payments exited with code -9"), 10, "restart notice")

            final: dict[str, Order] = {}

            async def all_final() -> bool:
                for order in placed:
                    if order.id not in final:
                        now = await client.call("orders.get", GetOrder(order.id), returns=Order)
                        if now.status in ("confirmed", "cancelled"):
                            final[order.id] = now
                return len(final) == ORDERS

            await _until(all_final, 90, lambda: f"{ORDERS - len(final)} orders final", 0.2)
        expected = {
            order.id: "cancelled" if n % DECLINED_EVERY == 0 else "confirmed"
            for n, order in enumerate(placed)
        }
        assert {oid: o.status for oid, o in final.items()} == expected

        await _until(
            lambda: mesh.outbox.exists() and len(mesh.outbox.read_text().splitlines()) >= ORDERS,
            30,
            "outbox",
        )
        await anyio.sleep(1.0)  # anything sent twice would have arrived by now
        sent = [json.loads(line) for line in mesh.outbox.read_text().splitlines()]
        per_order = Counter(note["order_id"] for note in sent)
        assert set(per_order) == set(expected) and set(per_order.values()) == {1}, per_order

        ledger = [json.loads(line) for line in mesh.ledger.read_text().splitlines()]
        charges = [entry for entry in ledger if entry["kind"] == "charge"]
        assert len(charges) == len(ledger)  # no refunds: declined orders were never charged
        keys_per_order: dict[str, set[str]] = {}
        for charge in charges:
            keys_per_order.setdefault(charge["order_id"], set()).add(charge["key"])
        confirmed = {oid for oid, status in expected.items() if status == "confirmed"}
        assert set(keys_per_order) == confirmed
        assert all(len(keys) == 1 for keys in keys_per_order.values()), keys_per_order
        print(
            f"e2e: {ORDERS} orders, {len(confirmed)} confirmed, {ORDERS - len(confirmed)} declined, "
            f"{len(sent)} notifications, {len(charges)} provider charge calls "
            f"({sum(len(k) for k in keys_per_order.values())} distinct charges)"
        )
    finally:
        code = mesh.stop()
        assert mesh.said("mesh: stopped"), "".join(mesh.lines[-30:])
    assert code == 0
    assert not children(mesh.proc.pid)


def test_detached_mesh_runs_in_the_background_until_down(tmp_path: Path):
    """`just up-detached` / `just down`: the mesh outlives the command that started it."""
    port = free_port()
    (tmp_path / "nats.conf").write_text('jetstream { store_dir: ".mesh/jetstream" }\n')
    (tmp_path / "mesh.toml").write_text(SAMPLE_MESH_TOML)
    env = {**os.environ, "MESH_OUTBOX": str(tmp_path / "outbox.jsonl")}

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return mesh_cli(*args, cwd=tmp_path, env=env, timeout=90)

    started = mesh("up", "--detach", "--port", str(port), "--config", "nats.conf")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((tmp_path / ".mesh" / "mesh.pid").read_text())
    try:
        listed = mesh("--url", f"nats://127.0.0.1:{port}", "ls")
        assert listed.returncode == 0
        for name in ("orders", "payments", "notifications"):
            assert name in listed.stdout
        again = mesh("up", "--detach", "--port", str(port), "--config", "nats.conf")
        assert again.returncode == 1 and "already running" in again.stdout
    finally:
        stopped = mesh("down")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (tmp_path / ".mesh" / "mesh.pid").exists()
    assert not alive(pid)  # gone, or a zombie whose parent has not reaped it yet


async def test_services_stop_when_the_supervisor_is_killed(tmp_path: Path):
    """No orphans even when `mesh up` itself dies by SIGKILL (Ctrl-C is the usual path)."""
    port = free_port()
    mesh = MeshProcess(tmp_path, port)
    try:
        await _until(lambda: mesh.said("mesh: ready"), 60, "mesh ready")
        started = children(mesh.proc.pid)
        services = [pid for pid, cmd in started.items() if "framework.cli run" in cmd]
        servers = [pid for pid, cmd in started.items() if "nats-server" in cmd]
        assert len(services) == 4 and len(servers) == 1, started
    finally:
        mesh.proc.kill()
        mesh.proc.wait()

    def alive() -> list[int]:
        return [pid for pid in services + servers if Path(f"/proc/{pid}").exists()]

    try:
        await _until(lambda: not alive(), 20, "the services and the server to stop")
    finally:
        for pid in alive():  # never leave them behind, even when the test fails
            os.kill(pid, signal.SIGKILL)
