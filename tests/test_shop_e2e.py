"""The shop under load and faults, on the mesh as `just up` starts it (real processes).

`mesh up` with this repository's `[tool.mesh]` services (the whole shop, the gateway and
the dashboard included); 300 orders through the gateway's `POST /orders`: some for a sold-out SKU, some above the payment limit, some declined by the
card issuer (`PAYMENTS_FAILURE_RATE`), some left hanging by a payments outage (the
process stopped with SIGSTOP for longer than the saga deadline); inventory is killed
with SIGKILL mid-run (the supervisor restarts it) and nats-server is restarted once.
Afterwards every invariant of the shop is checked, and the counts are printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from support.cli import MESH_MODULE, Running, alive, children, sample_project

from framework import connect
from framework.dev.devserver import free_port
from framework.testing import eventually
from services import orders as orders_module
from services.contracts import CreateOrder, GetOrder, Order, OrderItem, StockItem

pytestmark = pytest.mark.slow

ORDERS = 300
ORDER_TIMEOUT = 6.0  # the saga deadline, short so the outage hits it
PRICES = {"book-dune": 1_999, "mug-owl": 850, "pen-ink": 299, "lamp-arc": 4_500, "bike-road": 9_900}
OUTAGE_AT, KILL_INVENTORY_AT, RESTART_NATS_AT = 70, 160, 230


class Mesh(Running):
    """`mesh up` in a temporary project directory, with its output collected."""

    def __init__(self, workdir: Path, port: int, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = port
        (workdir / "nats.conf").write_text('jetstream { store_dir: ".mesh/jetstream" }\n')
        sample_project(workdir, nats_config="nats.conf")
        argv = [*MESH_MODULE, "up", "--port", str(port), "--no-color"]
        super().__init__(argv, workdir, {**os.environ, **env, "LOG_FORMAT": "json"})
        self.replacement: subprocess.Popen[bytes] | None = None

    def child(self, needle: str) -> tuple[int, str]:
        for pid, cmdline in children(self.proc.pid).items():
            if needle in cmdline:
                return pid, cmdline
        raise LookupError(f"no process {needle}")

    def restart_nats(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown) and start it again, same store."""
        pid, _ = self.child("nats-server")
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        log = (self.workdir / "nats-restarted.log").open("ab")
        self.replacement = subprocess.Popen(args, cwd=self.workdir, stdout=log, stderr=log)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 40) -> int:
        try:
            return super().stop(signum, timeout)
        finally:
            if self.replacement is not None:
                self.replacement.terminate()
                self.replacement.wait(20)


@dataclass
class Run:
    """What the test placed, and what it expects of each order."""

    placed: dict[int, Order] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # order id -> sold-out|declined|normal
    during_outage: set[str] = field(default_factory=set)
    retries: int = 0


def request(n: int) -> tuple[CreateOrder, str]:
    """Every tenth order is for the sold-out kite, every tenth + 1 above the card limit."""
    skus = list(PRICES)
    lines = [OrderItem(skus[n % 5], 1 + n % 3, PRICES[skus[n % 5]])]
    if n % 4 == 0:
        lines.append(OrderItem(skus[(n + 2) % 5], 1, PRICES[skus[(n + 2) % 5]]))
    kind = "normal"
    if n % 10 == 0:
        lines, kind = [*lines, OrderItem("kite-red", 1, 1_500)], "sold-out"
    elif n % 10 == 1:
        lines, kind = [OrderItem("lamp-arc", 1, 150_000)], "declined"
    return CreateOrder(customer_id=f"cust-{n % 40}", items=lines, idempotency_key=f"k-{n}"), kind


async def place(http: httpx.AsyncClient, client: Any, run: Run, n: int) -> None:
    """`POST /orders` at the gateway, retried with the same idempotency key while NATS
    restarts (the gateway answers 503/504 then, or the connection drops)."""
    req, kind = request(n)
    for _ in range(60):
        try:
            response = await http.post("/orders", json=msgspec.to_builtins(req))
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 202:
            break
        assert response is None or response.status_code in (502, 503, 504), response.text
        run.retries += 1
        await anyio.sleep(0.5)
    else:
        raise AssertionError(f"order {n} could not be placed")
    order = await client.call("orders.get", GetOrder(response.json()["id"]), returns=Order)
    run.placed[n] = order
    run.kinds[order.id] = kind


async def test_shop_under_load_and_faults(tmp_path: Path) -> None:
    port = free_port()
    ledger, outbox = tmp_path / "ledger.jsonl", tmp_path / "outbox.jsonl"
    gateway_port = free_port()
    env = {
        "GATEWAY_PORT": str(gateway_port),
        "DASHBOARD_PORT": str(free_port()),
        "ORDER_TIMEOUT": str(ORDER_TIMEOUT),
        "PAYMENTS_FAILURE_RATE": "0.1",
        "PAYMENTS_LEDGER": str(ledger),
        "MESH_OUTBOX": str(outbox),
    }
    mesh = Mesh(tmp_path, port, env)
    url = f"nats://127.0.0.1:{port}"
    run = Run()
    try:
        await eventually(lambda: mesh.said("mesh: ready"), 90, "mesh ready")
        gateway = f"http://127.0.0.1:{gateway_port}"
        async with (
            connect(url, max_reconnect_attempts=-1) as client,
            httpx.AsyncClient(base_url=gateway, timeout=10) as http,
        ):
            await place_with_faults(http, client, mesh, run)
            finals = await all_final(client, run)
            await check_invariants(client, run, finals, ledger, outbox)
    finally:
        code = mesh.stop()
        assert mesh.said("mesh: stopped"), "".join(mesh.lines[-40:])
    assert code == 0


async def place_with_faults(http: httpx.AsyncClient, client: Any, mesh: Mesh, run: Run) -> None:
    payments_pid = mesh.child("services.payments:service")[0]
    outage_end = 0.0
    for n in range(ORDERS):
        if n == OUTAGE_AT:  # payments hangs for longer than the deadline
            os.kill(payments_pid, signal.SIGSTOP)
            outage_end = time.monotonic() + ORDER_TIMEOUT + 4
        if outage_end and time.monotonic() >= outage_end:
            os.kill(payments_pid, signal.SIGCONT)
            outage_end = 0.0
        if n == KILL_INVENTORY_AT:
            os.kill(mesh.child("services.inventory:service")[0], signal.SIGKILL)
        if n == RESTART_NATS_AT:
            await anyio.to_thread.run_sync(mesh.restart_nats)
        await place(http, client, run, n)
        if outage_end:
            run.during_outage.add(run.placed[n].id)
        await anyio.sleep(0.08)
    if outage_end:
        await anyio.sleep(max(0.0, outage_end - time.monotonic()))
        os.kill(payments_pid, signal.SIGCONT)
    assert mesh.said("inventory exited with code -9")


async def all_final(client: Any, run: Run) -> dict[str, Order]:
    final: dict[str, Order] = {}

    async def every_order_final() -> bool:
        for order in run.placed.values():
            if order.id not in final:
                now = await client.call("orders.get", GetOrder(order.id), returns=Order)
                if now.status != "pending":
                    final[now.id] = now
        return len(final) == ORDERS

    await eventually(every_order_final, 240, lambda: f"{ORDERS - len(final)} orders still pending")
    return final


async def check_invariants(
    client: Any, run: Run, finals: dict[str, Order], ledger: Path, outbox: Path
) -> None:
    status = Counter(o.status for o in finals.values())
    assert set(status) <= {"confirmed", "cancelled"}, status
    confirmed = {oid for oid, o in finals.items() if o.status == "confirmed"}
    cancelled = set(finals) - confirmed
    for oid, kind in run.kinds.items():  # what was bound to fail, failed
        if kind != "normal":
            assert oid in cancelled, (oid, kind, finals[oid])
    # deliveries a killed process had taken come again after ack_wait: let them all settle
    await eventually(lambda: quiescent(client), 120, "every consumer caught up")
    sold = await check_stock(client, finals, confirmed)
    charges, refunded = await check_money(ledger, confirmed, cancelled)
    released = await check_stock_events(client, finals, confirmed)
    notes = await check_notifications(outbox, finals, confirmed)
    for oid in finals:  # each order's history folds to what orders answers
        folded = orders_module.fold(await client.history("order", oid))
        answered = await client.call("orders.get", GetOrder(oid), returns=Order)
        assert folded == answered and answered.status == finals[oid].status, (folded, answered)
    deadline = {oid for oid in cancelled if "saga deadline" in (finals[oid].reason or "")}
    assert deadline, "the payments outage left no order to the deadline"
    kinds = Counter(run.kinds[oid] for oid in cancelled)
    print(
        f"\nshop e2e: {ORDERS} orders through the gateway ({run.retries} retried during the NATS "
        "restart): "
        f"{len(confirmed)} confirmed, {len(cancelled)} cancelled "
        f"(sold-out {kinds['sold-out']}, above limit {kinds['declined']}, "
        f"declined/out of stock otherwise {kinds['normal'] - len(deadline)}, "
        f"deadline {len(deadline)}, {len(deadline & run.during_outage)} placed in the outage); "
        f"{charges} charges, {refunded} refunded once; {released} reservations released once; "
        f"{sold} items sold; {notes} notifications ({len(confirmed)} of them receipts)"
    )


async def check_stock(client: Any, finals: dict[str, Order], confirmed: set[str]) -> int:
    """Never below zero, conserved, nothing left held, sold = what confirmed orders hold."""
    await eventually(lambda: nothing_held(client), 60, "every hold released or committed")
    items = {i.sku: i for i in await client.call("inventory.list", returns=list[StockItem])}
    sold: Counter[str] = Counter()
    for oid in confirmed:
        for item in finals[oid].items:
            sold[item.sku] += item.quantity
    for sku, item in items.items():
        assert item.available >= 0 and item.reserved == 0 and not item.holds, item
        assert item.available + item.reserved + item.sold == item.received, item
        assert item.sold == sold[sku], (sku, item.sold, sold[sku])
    return sum(sold.values())


async def check_money(ledger: Path, confirmed: set[str], cancelled: set[str]) -> tuple[int, int]:
    """One charge per order at most; every cancelled order that was charged refunded once."""
    charges, refunds = read_ledger(ledger)
    charged_and_cancelled = set(charges) & cancelled
    await eventually(lambda: set(read_ledger(ledger)[1]) >= charged_and_cancelled, 60, "refunds")
    await anyio.sleep(2.0)  # a second charge or refund would have come by now
    charges, refunds = read_ledger(ledger)
    assert all(len(keys) == 1 for keys in charges.values()), charges
    assert set(charges) >= confirmed
    assert not (set(refunds) & confirmed), set(refunds) & confirmed
    assert set(refunds) == charged_and_cancelled, set(refunds) ^ charged_and_cancelled
    for oid in charged_and_cancelled:
        assert refunds[oid] == charges[oid], (oid, charges[oid], refunds.get(oid))
    return sum(len(k) for k in charges.values()), len(refunds)


async def check_stock_events(client: Any, finals: dict[str, Order], confirmed: set[str]) -> int:
    """A confirmed order's stock committed once; a cancelled one's released once if it
    was held (a reservation whose announcement a SIGKILL cut off is released all the
    same: then stock.released.v1 comes without stock.reserved.v1), never sold."""
    released = 0
    for oid in finals:
        types = Counter(r.type for r in await client.history("stock", oid))
        if oid in confirmed:
            assert types == {"stock.reserved.v1": 1, "stock.committed.v1": 1}, (oid, types)
            continue
        assert types["stock.released.v1"] <= 1 and not types["stock.committed.v1"], (oid, types)
        if types["stock.reserved.v1"]:
            assert types == {"stock.reserved.v1": 1, "stock.released.v1": 1}, (oid, types)
        released += types["stock.released.v1"]
    return released


async def check_notifications(outbox: Path, finals: dict[str, Order], confirmed: set[str]) -> int:
    """One notification per final order, of its outcome; one receipt per confirmed order."""
    everything = ORDERS + len(confirmed)
    await eventually(lambda: len(outbox_lines(outbox)) >= everything, 90, "notifications")
    await anyio.sleep(1.0)
    sent = Counter((n["order_id"], n["kind"]) for n in outbox_lines(outbox))
    expected = {(oid, f"order_{o.status}") for oid, o in finals.items()}
    expected |= {(oid, "receipt") for oid in confirmed}
    assert set(sent) == expected, set(sent) ^ expected
    assert set(sent.values()) == {1}, [key for key, count in sent.items() if count > 1]
    return sum(sent.values())


async def quiescent(client: Any) -> bool:
    """No event stream has a consumer with anything pending or unacknowledged."""
    for stream in await client.js.streams_info():
        if not stream.config.name.startswith("EVENTS_"):
            continue
        for consumer in await client.js.consumers_info(stream.config.name):
            if consumer.num_pending or consumer.num_ack_pending:
                return False
    return True


async def nothing_held(client: Any) -> bool:
    items = await client.call("inventory.list", returns=list[StockItem])
    return all(not item.holds for item in items)


def read_ledger(path: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    charges: dict[str, set[str]] = defaultdict(set)
    refunds: dict[str, set[str]] = defaultdict(set)
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            target = charges if entry["kind"] == "charge" else refunds
            target[entry["order_id"]].add(entry["key"])
    return charges, refunds


def outbox_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
