"""Minimal raw nats-py repro: fast-ingest batches from several connections on an R3 stream.

    python -m bench.fast_batch_ids [--writers N] [--batches N] [--size N] [--replicas N]

Issue 17 saw 28-60 % of the idempotency-marker batches go unanswered on a 3-node cluster
with two or more writers, never on one node or with one writer. This script takes the
framework out of the picture: N plain nats-py connections each send `--batches`
fast-ingest batches (nats-server 2.14+, `allow_batched`) of `--size` messages to one
stream, as the reply-subject protocol says (`<prefix>.<batch id>.<flow>.<gap mode>.
<batch seq>.<op>.$FI`), and count the batches whose commit was answered in time.

It runs twice: once with the batch id the framework used to send (a per-connection
counter, so two connections send batch "1", "2", ... at about the same time), once with
a batch id unique across connections (a NUID). The finding: nats-server keys fast
batches by batch id per *stream*, not per connection (`batches.fast[batch.id]` in
server/stream.go), so two connections using the same id at once interleave into one
batch: the second one's first message reads as a backward gap, the server commits or
abandons the other's batch, and the second connection's commit is never answered. On
a single server a batch is stored inline and is gone by the time the other's starts,
which is why one node hid it; R3 keeps a batch open until its proposals are applied.
So it was ours: batch ids must be unique per stream, as the ADR's "uuid" says.
The framework now uses the inbox's NUID plus the counter (`framework.transport.mux`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import nats
from nats.js import api
from nats.nuid import NUID

from framework.dev.devserver import NatsCluster, NatsServer


@dataclass
class Result:
    answered: int = 0
    unanswered: int = 0
    errors: int = 0
    stored_short: int = 0
    slowest_s: float = 0.0


async def _writer(
    url: list[str],
    stream_subject: str,
    batches: int,
    size: int,
    unique: bool,
    inflight: int,
    r: Result,
) -> None:
    """One connection sending `batches` batches, `inflight` of them at a time (the
    framework's settlement has several marker batches in flight at once)."""
    nc = await nats.connect(servers=url)
    inbox = nc.new_inbox()
    nuid = NUID()
    replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
    counter = iter(range(1, batches + 1))

    async def on_reply(msg: Any) -> None:
        batch_id = msg.subject[len(inbox) + 1 :].split(".", 1)[0]
        future = replies.get(batch_id)
        if future is None or future.done() or not msg.data:
            return
        frame = json.loads(msg.data)
        if frame.get("type") == "ack":
            return  # flow control, not the commit's answer
        future.set_result(frame)

    async def send_batches() -> None:
        for n in counter:
            batch_id = nuid.next().decode() if unique else format(n, "x")
            future = asyncio.get_running_loop().create_future()
            replies[batch_id] = future
            started = time.monotonic()
            for seq in range(1, size + 1):
                op = 2 if seq == size else 0 if seq == 1 else 1  # commit, start, append
                subject = f"{stream_subject}.{batch_id}.{seq}"
                reply = f"{inbox}.{batch_id}.1000.fail.{seq}.{op}.$FI"
                await nc.publish(subject, b"1", reply=reply)
            try:
                frame = await asyncio.wait_for(future, 2.0)
            except TimeoutError:
                r.unanswered += 1
            else:
                if frame.get("error"):
                    r.errors += 1
                elif frame.get("count") != size:
                    r.stored_short += 1
                else:
                    r.answered += 1
            r.slowest_s = max(r.slowest_s, time.monotonic() - started)
            del replies[batch_id]

    await nc.subscribe(inbox + ".>", cb=on_reply)
    try:
        await asyncio.gather(*(send_batches() for _ in range(inflight)))
    finally:
        await nc.close()


async def run(
    urls: list[str], writers: int, batches: int, size: int, replicas: int, inflight: int
) -> None:
    nc = await nats.connect(servers=urls)
    js = nc.jetstream()
    for unique in (False, True):
        name = "FASTBATCH_UNIQUE" if unique else "FASTBATCH_COUNTER"
        await js.add_stream(
            api.StreamConfig(
                name=name,
                subjects=[f"{name.lower()}.>"],
                num_replicas=replicas,
                allow_batched=True,
            )
        )
        result = Result()
        started = time.monotonic()
        await asyncio.gather(
            *(
                _writer(urls, f"{name.lower()}.w{w}", batches, size, unique, inflight, result)
                for w in range(writers)
            )
        )
        elapsed = time.monotonic() - started
        total = writers * batches
        kind = "unique (NUID)" if unique else "per-connection counter"
        print(
            f"batch ids {kind:24}: {result.answered}/{total} answered, "
            f"{result.unanswered} unanswered after 2 s, {result.errors} errors, "
            f"{result.stored_short} stored short; slowest {result.slowest_s:.2f} s; "
            f"{elapsed:.1f} s in all"
        )
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=4, help="batches in flight per writer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.replicas == 1:
            with NatsServer(store_dir=f"{tmp}/single") as server:
                asyncio.run(
                    run([server.url], args.writers, args.batches, args.size, 1, args.inflight)
                )
        else:
            with NatsCluster(args.replicas, base_dir=tmp) as cluster:
                asyncio.run(
                    run(
                        cluster.urls,
                        args.writers,
                        args.batches,
                        args.size,
                        args.replicas,
                        args.inflight,
                    )
                )


if __name__ == "__main__":
    main()
