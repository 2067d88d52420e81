"""A service started together with its cluster waits for JetStream instead of failing.

A cluster's nodes take clients at once but ignore JetStream requests until they have
elected a meta leader (half a second here, up to 9 s on a busy machine): the README's
cluster block (`nats-server ... &` three times, then `mesh run`) hit that window.
"""

from __future__ import annotations

from pathlib import Path

import anyio

from framework import Service
from framework.dev.devserver import NatsCluster


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
