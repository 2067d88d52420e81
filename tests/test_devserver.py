"""Real nats-server processes: start, stop, crash, restart, and a 3-node cluster."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StorageType

from framework.dev.devserver import (
    NatsCluster,
    NatsServer,
    find_nats_server,
    free_port,
    wait_jetstream_ready,
)
from framework.testing import eventually


async def _connect(servers: str | list[str], **options: Any) -> Any:
    async def quiet(_: Exception) -> None:
        return None

    return await nats.connect(servers=servers, error_cb=quiet, connect_timeout=2, **options)


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def test_find_nats_server() -> None:
    path = find_nats_server()
    assert os.access(path, os.X_OK)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert "nats-server" in out.stdout


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_start_connect_stop() -> None:
    server = NatsServer()
    own_dir = server.store_dir
    assert own_dir is not None and own_dir.is_dir()
    with server:
        assert server.running and server.pid is not None
        assert server.url == f"nats://127.0.0.1:{server.port}"
        nc = await _connect(server.url)

        async def pong(msg: Any) -> None:
            await msg.respond(b"pong")

        sub = await nc.subscribe("ping", cb=pong)
        reply = await nc.request("ping", b"", timeout=2)
        assert reply.data == b"pong"
        await sub.unsubscribe()
        await nc.close()
        assert "Server is ready" in server.log_tail()
    assert not server.running and server.pid is None
    assert _refuses(server.port)
    assert not own_dir.exists()  # our temp dir is removed


async def test_restart_keeps_port_stream_and_messages(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with NatsServer(store_dir=store) as server:
        port, first_pid = server.port, server.pid
        nc = await _connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="ORDERS", subjects=["orders.>"], storage=StorageType.FILE)
        for i in range(3):
            await js.publish("orders.created", f"o-{i}".encode())
        await nc.close()

        server.restart()
        assert server.port == port and server.pid != first_pid
        await wait_jetstream_ready(server.url, timeout=10)
        nc = await _connect(server.url)
        js = nc.jetstream()
        info = await js.stream_info("ORDERS")
        assert info.state.messages == 3
        assert (await js.get_msg("ORDERS", 3)).data == b"o-2"
        await nc.close()
    assert store.is_dir()  # a caller's store dir is never deleted


async def test_kill_then_restart_and_client_reconnects(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "store") as server:
        reconnected = asyncio.Event()

        async def on_reconnect() -> None:
            reconnected.set()

        nc = await _connect(
            server.url,
            reconnect_time_wait=0.1,
            max_reconnect_attempts=-1,
            reconnected_cb=on_reconnect,
        )
        js = nc.jetstream()
        await js.add_stream(name="EVENTS", subjects=["events.>"])

        server.kill()
        assert not server.running
        assert _refuses(server.port)

        server.restart()
        await asyncio.wait_for(reconnected.wait(), 10)
        await wait_jetstream_ready(server.url, timeout=10)
        ack = await js.publish("events.x", b"after crash")
        assert ack.stream == "EVENTS"
        await nc.close()


async def test_config_file_store_dir_wins(tmp_path: Path) -> None:
    store = tmp_path / "from-config"
    config = tmp_path / "nats.conf"
    config.write_text(f'jetstream {{ store_dir: "{store}" }}\n')
    with NatsServer(config_file=config) as server:
        assert server.store_dir is None
        nc = await _connect(server.url)
        await nc.jetstream().add_stream(name="CFG", subjects=["cfg.>"])
        await nc.close()
    assert (store / "jetstream").is_dir()


def test_start_failure_reports_log() -> None:
    with NatsServer() as first:
        clash = NatsServer(first.port, jetstream=False)
        try:
            with pytest.raises(RuntimeError, match="address already in use"):
                clash.start(timeout=5)
            assert not clash.running
        finally:
            clash.cleanup()
        assert first.running


async def test_nats_url_fixture(nats_server: NatsServer, nats_url: str) -> None:
    assert nats_url == nats_server.url
    await wait_jetstream_ready(nats_url, timeout=5)


async def test_client_fixture(client: Any) -> None:
    assert client is not None


class _FakeService:
    """Stands in for framework.service.Service: records serve() enter/exit."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    @asynccontextmanager
    async def serve(self, url: str, /) -> AsyncIterator[None]:
        self.log.append(f"start {self.name} {url}")
        yield
        self.log.append(f"stop {self.name}")


@pytest.fixture
def serve_log(nats_url: str) -> Iterator[list[str]]:
    log: list[str] = []
    yield log
    # Torn down after `serve`: services stopped in reverse order.
    assert log == [f"start a {nats_url}", "start b other", "stop b", "stop a"]


async def test_serve_fixture(serve_log: list[str], serve: Any) -> None:
    await serve(_FakeService("a", serve_log))
    await serve(_FakeService("b", serve_log), "other")
    assert len(serve_log) == 2


async def test_cluster_replicates_and_survives_node_loss(nats_cluster: NatsCluster) -> None:
    assert len(nats_cluster.nodes) == 3 and nats_cluster.running
    assert nats_cluster.url == ",".join(nats_cluster.urls)
    nc = await _connect(nats_cluster.urls, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    js = nc.jetstream(timeout=5)
    info = await js.add_stream(
        name="ORDERS", subjects=["orders.>"], num_replicas=3, storage=StorageType.FILE
    )
    assert info.cluster is not None and info.cluster.leader is not None
    assert len(info.cluster.replicas or []) == 2
    await js.publish("orders.created", b"1")

    # Lose a follower of the stream: two of three keep quorum, publishing goes on.
    follower = next(p.name for p in info.cluster.replicas or [] if p.name)
    node = next(n for n in nats_cluster.nodes if n.server_name == follower)
    node.kill()
    assert not node.running

    async def publishes() -> Any:
        try:
            return await js.publish("orders.created", b"2")
        except Exception:  # failover takes a moment
            return None

    ack = await eventually(publishes, 10, "a publish to the two remaining replicas", 0.1)
    assert ack.seq == 2

    # Bring it back: it rejoins and catches up.
    node.restart()

    async def all_current() -> bool:
        try:
            si = await js.stream_info("ORDERS")
        except Exception:  # the cluster may not answer while the node rejoins
            return False
        peers = (si.cluster.replicas or []) if si.cluster is not None else []
        current = len(peers) == 2 and all(p.current and not p.offline for p in peers)
        return si.state.messages == 2 and current

    await eventually(all_current, 15, "the restarted node to catch up", 0.1)
    await nc.close()
