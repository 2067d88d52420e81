"""One service name, one program: consumer ownership and divergent instances, on a real server.

A durable consumer records which program owns it; another program under the same
service name is refused, replicas join, changed settings need a newer version or an
explicit takeover, and `$SRV.INFO` shows instances of one service that differ.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import anyio
import msgspec
import pytest
import structlog
from support.cli import mesh, mesh_command
from support.events import OrderCreated

from framework import ConfigConflict, Context, Service
from framework.events.ownership import Owner, is_newer
from framework.rpc.discovery import divergences
from framework.testing import eventually

DURABLE = "payments_on_order_created"


class OrderPlaced(msgspec.Struct):  # the README's idea of the same event: another schema
    order_id: str
    customer: str


def payments(
    version: str = "1.0.0",
    payload: type[Any] = OrderCreated,
    event_type: str = "order.created.v1",
    seen: list[str] | None = None,
    *,
    takeover: bool | None = None,
    **options: Any,
) -> Service:
    """A `payments` service with one subscriber named `on_order_created`."""
    svc = Service("payments", version=version, takeover=takeover)

    async def on_order_created(event: Any, ctx: Context) -> None:
        if seen is not None:
            seen.append(event.order_id)

    on_order_created.__annotations__["event"] = payload
    svc.subscribe(event_type, **options)(on_order_created)
    return svc


async def consumer_config(client: Any) -> Any:
    return (await client.js.consumer_info("EVENTS_ORDER", DURABLE)).config


async def refused(svc: Service, url: str) -> ConfigConflict:
    with pytest.raises(ConfigConflict) as info:
        async with svc.serve(url):
            pass
    return info.value


# -- another program ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "event_type", "differs"),
    [(OrderPlaced, "order.created.v1", "payload schema"), (OrderCreated, "order.placed.v1", None)],
)
async def test_another_program_under_the_same_name_is_refused_naming_both(
    serve, client, nats_url, payload, event_type, differs
):
    await serve(payments("1.0.0", max_deliver=7))
    before = await consumer_config(client)
    differs = differs or "event_type"
    error = await refused(payments("0.1.0", payload, event_type, max_deliver=6), nats_url)

    message = str(error)
    assert error.what == f"consumer EVENTS_ORDER/{DURABLE}" and differs in error.differences
    assert "It belongs to payments 1.0.0" in message  # what the consumer has ...
    assert "this program declares payments 0.1.0" in message  # ... what this code declares
    assert message.count(f"{__name__}:payments.<locals>.on_order_created") == 2
    assert "a name of its own" in message and "takeover=True" in message  # how to resolve
    assert "MESH_TAKEOVER=1" in message and "mesh run --takeover" in message
    assert await consumer_config(client) == before  # nothing rewritten
    assert before.max_deliver == 8  # 7 + the crash allowance


async def test_two_programs_starting_at_once_never_share_the_consumer(client, nats_url):
    await client.js.add_stream(name="EVENTS_ORDER", subjects=["events.order.>"])
    outcomes: list[str] = []

    async def start(svc: Service) -> None:
        try:
            async with svc.serve(nats_url):
                outcomes.append("served")
        except ConfigConflict:
            outcomes.append("refused")

    async with anyio.create_task_group() as group:
        group.start_soon(start, payments("1.0.0"))
        group.start_soon(start, payments("1.0.0", OrderPlaced))
    assert sorted(outcomes) == ["refused", "served"]


async def test_takeover_lets_another_program_have_the_consumer_and_logs_it(serve, client):
    await serve(payments("1.0.0"))
    seen: list[str] = []
    with structlog.testing.capture_logs() as logs:
        await serve(payments("0.1.0", OrderPlaced, seen=seen, takeover=True))
    (taken,) = [line for line in logs if line["event"] == "consumer taken over"]
    assert taken["log_level"] == "warning" and "payments 1.0.0" in taken["was"]
    recorded = Owner.read((await consumer_config(client)).metadata)
    assert recorded is not None and recorded.version == "0.1.0"
    assert "OrderPlaced" not in recorded.schema  # a hash, not the schema itself


# -- replicas ---------------------------------------------------------------------------


async def test_a_compatible_replica_joins_and_both_share_the_work(serve, client):
    first: list[str] = []
    second: list[str] = []
    await serve(payments("1.0.0", seen=first, max_concurrency=1))
    recorded = await consumer_config(client)
    assert Owner.read(recorded.metadata) is not None  # the first one recorded itself
    with structlog.testing.capture_logs() as logs:
        await serve(payments("1.0.0", seen=second, max_concurrency=1))
    assert [line for line in logs if "consumer" in line["event"]] == []  # joined quietly
    assert (await consumer_config(client)).metadata == recorded.metadata  # nothing rewritten

    for n in range(40):
        await client.publish("order.created.v1", OrderCreated(f"o-{n}", n))
    await eventually(lambda: len(first) + len(second) == 40, what=lambda: f"{first} {second}")
    assert first and second  # both replicas took work
    assert Counter(first + second) == Counter(f"o-{n}" for n in range(40))  # each once


async def test_the_consumer_records_its_owner(serve, client):
    await serve(payments("1.2.0", max_deliver=7, backoff=[0.5, 2]))
    metadata = (await consumer_config(client)).metadata
    assert metadata["mesh.service"] == "payments" and metadata["mesh.version"] == "1.2.0"
    assert metadata["mesh.event_type"] == "order.created.v1"
    assert metadata["mesh.handler"] == f"{__name__}:payments.<locals>.on_order_created"
    assert len(metadata["mesh.schema"]) == 16
    settings = json.loads(metadata["mesh.settings"])
    assert (settings["max_deliver"], settings["backoff"]) == (7, [0.5, 2.0])


# -- changed settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "ours", "theirs"),
    [("max_deliver", 7, 6), ("backoff", [1.0], [2.0]), ("ack_wait", 30.0, 10.0)],
)
async def test_changed_settings_of_the_same_version_are_refused(
    serve, client, nats_url, option, ours, theirs
):
    await serve(payments("1.0.0", **{option: ours}))
    before = await consumer_config(client)
    error = await refused(payments("1.0.0", **{option: theirs}), nats_url)
    assert error.differences == {option: (ours, theirs)}
    assert "raise the service's version" in str(error) and "takeover=True" in str(error)
    assert await consumer_config(client) == before  # not rewritten


async def test_an_older_version_cannot_roll_settings_back(serve, client, nats_url):
    await serve(payments("1.1.0", max_deliver=6))
    error = await refused(payments("1.0.0", max_deliver=7), nats_url)
    assert error.differences == {"max_deliver": (6, 7)}
    assert (await consumer_config(client)).max_deliver == 7  # 6 + the crash allowance


async def test_a_newer_version_applies_its_settings_and_logs_the_diff(serve, client):
    await serve(payments("1.0.0", max_deliver=7))
    with structlog.testing.capture_logs() as logs:
        await serve(payments("1.1.0", max_deliver=6))
    (updated,) = [line for line in logs if line["event"].startswith("consumer settings")]
    assert updated["log_level"] == "warning"
    assert updated["changes"] == {"max_deliver": {"was": 7, "now": 6}}
    assert "payments 1.0.0" in updated["was"] and "payments 1.1.0" in updated["owner"]
    config = await consumer_config(client)
    assert config.max_deliver == 7 and config.metadata["mesh.version"] == "1.1.0"


async def test_a_newer_version_with_the_same_settings_is_recorded(serve, client):
    await serve(payments("1.0.0"))
    with structlog.testing.capture_logs() as logs:
        await serve(payments("1.0.1"))
    assert [line["log_level"] for line in logs if "version recorded" in line["event"]] == ["info"]
    assert (await consumer_config(client)).metadata["mesh.version"] == "1.0.1"


@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_takeover_applies_changed_settings_and_logs_them(serve, client, monkeypatch, how):
    await serve(payments("1.0.0", max_deliver=7))
    if how == "environment":
        monkeypatch.setenv("MESH_TAKEOVER", "1")
    with structlog.testing.capture_logs() as logs:
        await serve(payments("1.0.0", max_deliver=6, takeover=True if how == "argument" else None))
    (taken,) = [line for line in logs if line["event"] == "consumer taken over"]
    assert taken["log_level"] == "warning"
    assert taken["changes"] == {"max_deliver": {"was": 7, "now": 6}}
    assert (await consumer_config(client)).max_deliver == 7


async def test_takeover_false_overrides_the_environment(serve, nats_url, monkeypatch):
    await serve(payments("1.0.0", max_deliver=7))
    monkeypatch.setenv("MESH_TAKEOVER", "1")
    await refused(payments("1.0.0", max_deliver=6, takeover=False), nats_url)


async def test_a_consumer_edited_by_hand_is_not_silently_reset(serve, client, nats_url):
    await serve(payments("1.0.0"))
    config = await consumer_config(client)
    await client.js.add_consumer("EVENTS_ORDER", config.evolve(max_ack_pending=5))
    error = await refused(payments("1.0.0"), nats_url)
    assert error.differences == {"max_ack_pending": (5, 1000)}


# -- consumers made before ownership was recorded -------------------------------------


async def test_a_consumer_without_a_record_is_adopted(serve, client):
    seen: list[str] = []
    svc = payments("1.0.0", seen=seen, max_deliver=7)
    await client.js.add_stream(name="EVENTS_ORDER", subjects=["events.order.>"])
    consumer = svc.subscribers[0].consumer
    consumer.stream = "EVENTS_ORDER"
    legacy = consumer.config().evolve(metadata=None, max_deliver=7)  # as the old code made it
    await client.js.add_consumer("EVENTS_ORDER", legacy)
    assert Owner.read((await consumer_config(client)).metadata) is None

    with structlog.testing.capture_logs() as logs:
        await serve(svc)
    events = {line["event"]: line for line in logs if "consumer" in line["event"]}
    assert events["consumer adopted: its owner is now recorded"]["log_level"] == "info"
    assert events["consumer settings updated"]["changes"] == {"max_deliver": {"was": 6, "now": 7}}
    config = await consumer_config(client)
    assert config.max_deliver == 8 and config.metadata["mesh.version"] == "1.0.0"
    await client.publish("order.created.v1", OrderCreated("o-1", 1))
    await eventually(lambda: seen == ["o-1"])


# -- RPC: instances of one service that differ ------------------------------------------


class Charge(msgspec.Struct):
    order_id: str
    amount_cents: int


class ChargeV2(msgspec.Struct):
    order_id: str
    amount: float


def charging(version: str, request: type[Any]) -> Service:
    svc = Service("billing", version=version)

    async def charge(req: Any) -> str:
        return "ok"

    charge.__annotations__["req"] = request
    svc.rpc("charge")(charge)
    return svc


async def test_instances_of_one_service_that_agree_are_not_flagged(serve, client):
    await serve(charging("1.0.0", Charge))
    await serve(charging("1.0.0", Charge))
    infos = await client.info("billing")
    assert len(infos) == 2 and divergences(infos) == []


async def test_instances_advertising_other_schemas_or_versions_are_flagged(serve, client):
    await serve(charging("1.0.0", Charge))
    await serve(charging("1.0.0", Charge))
    await serve(charging("2.0.0", ChargeV2))
    await serve(Service("other", version="9.0.0"))
    infos = await client.info()
    (found,) = divergences(infos)
    billing = {i.id: i.version for i in infos if i.name == "billing"}
    assert found.service == "billing" and found.versions == billing
    assert found.differs == ["version", "charge.request_schema"]
    assert sorted(map(len, found.groups)) == [1, 2]
    newer = next(i for i, v in billing.items() if v == "2.0.0")
    assert [newer] in found.groups
    assert "billing" in found.describe() and newer in found.describe()


def test_versions_compare_as_releases() -> None:
    assert is_newer("1.10.0", "1.9.9") and is_newer("1.0.0", "1.0.0-rc.1")
    assert is_newer("v2", "1.99") and is_newer("1.0.1", "1.0")
    assert not is_newer("1.0", "1.0.0") and not is_newer("1.0.0", "1.0.0")
    assert not is_newer("0.9.0", "1.0.0") and not is_newer("dev", "1.0.0")
    assert not is_newer("1.0.0", "dev")


async def test_mesh_ls_flags_instances_that_differ(serve, nats_url, capsys):
    await serve(charging("1.0.0", Charge))
    await serve(charging("1.0.0", Charge))
    await serve(Service("other", version="9.0.0"))
    capsys.readouterr()
    assert await mesh("--url", nats_url, "ls") == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "ID", "VERSION"] and len(rows) == 3  # nothing to flag

    await serve(charging("2.0.0", ChargeV2))
    capsys.readouterr()
    assert await mesh("--url", nats_url, "ls") == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["!", "NAME", "ID", "VERSION"]
    notes = [line for line in lines if "instances differ" in line]
    flags = [line.split()[:2] for line in lines if line not in notes]
    assert sorted(flags) == [["!", "billing"]] * 3 + [["-", "other"]]
    (note,) = notes
    assert note.startswith("! billing: instances differ in version, charge.request_schema")


# -- mesh run --takeover ------------------------------------------------------------------

DRIFTED = """
import msgspec
from framework import Service

class OrderCreated(msgspec.Struct):
    order_id: str
    amount_cents: int

service = Service("payments", version="1.0.0")

@service.subscribe("order.created.v1", max_deliver=6)
async def on_order_created(event: OrderCreated) -> None: ...
"""


async def test_mesh_run_refuses_drift_and_takes_over_with_the_flag(
    serve, client, nats_url, tmp_path
):
    await serve(payments("1.0.0", max_deliver=7))
    (tmp_path / "drifted.py").write_text(DRIFTED)
    env = {k: v for k, v in os.environ.items() if k != "MESH_TAKEOVER"}
    command = [*mesh_command(), "--url", nats_url, "run", "drifted:service"]
    command += ["--app-dir", str(tmp_path), "--grace", "1"]

    with anyio.fail_after(30):  # refused at start, not served
        done = await anyio.run_process(command, env=env, check=False)
    assert done.returncode != 0
    err = done.stderr.decode()
    assert "exists with a different configuration (max_deliver: existing=7 declared=6)" in err
    assert "--takeover" in err and "Traceback" not in err
    assert (await consumer_config(client)).max_deliver == 8

    async with await anyio.open_process([*command, "--takeover"], env=env) as process:
        try:
            await eventually(lambda: consumer_max_deliver(client, 7), timeout=20)
        finally:
            process.terminate()
            await process.wait()


async def consumer_max_deliver(client: Any, expected: int) -> bool:
    return bool((await consumer_config(client)).max_deliver == expected)


async def test_workers_refused_by_a_conflict_are_not_restarted(serve, nats_url, tmp_path):
    """A configuration conflict ends `mesh run --workers` with its exit code, no crash loop."""
    await serve(payments("1.0.0", max_deliver=7))
    (tmp_path / "drifted.py").write_text(DRIFTED)
    env = {k: v for k, v in os.environ.items() if k != "MESH_TAKEOVER"}
    command = [*mesh_command(), "--url", nats_url, "run", "drifted:service", "--workers", "2"]
    command += ["--app-dir", str(tmp_path), "--grace", "1"]

    with anyio.fail_after(30):
        done = await anyio.run_process(command, env=env, check=False)
    err = done.stderr.decode()
    assert done.returncode == 8, err  # ExitCode.CONFIG_CONFLICT
    assert "not restarted" in err and "restarting it" not in err
