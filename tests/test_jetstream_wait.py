"""A service started together with its cluster waits for JetStream instead of failing.

A cluster's nodes take clients at once but ignore JetStream requests until they have
elected a meta leader (half a second here, up to 9 s on a busy machine): the README's
cluster block (`nats-server ... &` three times, then `mesh run`) hit that window.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from framework import MeshError, Service
from framework.dev.devserver import NatsCluster, NatsServer


async def test_a_service_waits_for_its_cluster_to_elect_a_leader(tmp_path: Path) -> None:
    cluster = NatsCluster(3, base_dir=tmp_path)
    first, *others = cluster.nodes
    started = anyio.Event()
    service = Service("waiter", publishes=["waiter.done.v1"])  # creates a stream at start

    async def serve() -> None:
        async with service.serve(first.url):
            started.set()
            await anyio.sleep_forever()

    try:
        await anyio.to_thread.run_sync(first.start)  # alone: no quorum, no leader
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(serve)
            await anyio.sleep(6)  # past a JetStream request's 5 s: it failed here before
            assert not started.is_set()
            for node in others:
                await anyio.to_thread.run_sync(node.start)
            with anyio.fail_after(30):
                await started.wait()
            tasks.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(cluster.cleanup)


async def test_a_user_not_allowed_to_ask_is_not_kept_waiting(tmp_path: Path) -> None:
    conf = tmp_path / "deny-info.conf"
    conf.write_text(
        'authorization { users: [{user: "svc", password: "pw",'
        ' permissions: {publish: {deny: ["$JS.API.INFO"]}}}] }\n'
    )
    with NatsServer(config_file=conf, store_dir=tmp_path / "js") as server:
        await anyio.to_thread.run_sync(server.start)
        url = server.url.replace("nats://", "nats://svc:pw@")
        service = Service("denied", publishes=["denied.done.v1"])
        with anyio.fail_after(15):  # the wait gives up after 30 s; a refusal ends it at once
            async with service.serve(url):
                pass


async def test_a_server_without_jetstream_fails_the_service_at_once() -> None:
    with NatsServer(jetstream=False) as server:
        await anyio.to_thread.run_sync(server.start)
        service = Service("nojs", publishes=["nojs.done.v1"])
        with anyio.fail_after(15), pytest.raises(MeshError):
            async with service.serve(server.url):
                pass
