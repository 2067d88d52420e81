"""Raw nats-py processes measured by `bench.memory`, kept free of framework imports.

    python -m bench.raw_peer idle URL PING_SUBJECT
    python -m bench.raw_peer drain URL SUBJECT STREAM DURABLE FETCH_BATCH

(each also takes --uvloop)

`bench.common` imports `framework` (for the dev server), so a raw peer started from
`bench.memory` itself would carry the framework's modules in its resident set and
flatter the comparison. This module imports only the standard library and nats-py.
Both run until their standard input closes, like every `bench.common.Peer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Coroutine
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeoutError


async def wait_for_stdin_eof() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


async def idle(url: str, ping_subject: str) -> None:
    """One connection and one subscription (answering, so the parent knows it is up)."""
    nc = await nats.connect(url, name="bench-memory-raw")

    async def answer(msg: Any) -> None:
        await msg.respond(b"pong")

    await nc.subscribe(ping_subject, cb=answer)
    await nc.flush()
    await wait_for_stdin_eof()
    await nc.drain()


async def drain(url: str, subject: str, stream: str, durable: str, batch: int) -> None:
    """A pull consumer: fetch, json.loads and ack each message, until stdin closes."""
    nc = await nats.connect(url, name="bench-memory-raw-drain")
    js = nc.jetstream()
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)

    async def consume() -> None:
        while True:
            try:
                msgs = await sub.fetch(batch=batch, timeout=1)
            except NatsTimeoutError:
                continue
            for msg in msgs:
                json.loads(msg.data)
                await msg.ack()

    task = asyncio.ensure_future(consume())
    await wait_for_stdin_eof()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await nc.close()


def run(main: Coroutine[Any, Any, None], use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)


def main(argv: list[str]) -> int:
    use_uvloop = "--uvloop" in argv
    argv = [a for a in argv if a != "--uvloop"]
    if argv[:1] == ["idle"] and len(argv) == 3:
        run(idle(argv[1], argv[2]), use_uvloop)
        return 0
    if argv[:1] == ["drain"] and len(argv) == 6:
        run(drain(argv[1], argv[2], argv[3], argv[4], int(argv[5])), use_uvloop)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
