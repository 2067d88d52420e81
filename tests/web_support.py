"""Shared by the web tests: real HTTP servers (uvicorn, in the test's loop), SSE reading,
and a service for the dashboard to show."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import uvicorn

from framework import Context, Reject, Service
from framework.dev.devserver import free_port

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """Debian's chromium (`apt-get install chromium`), or CHROMIUM_PATH."""
    configured = os.environ.get("CHROMIUM_PATH")
    if configured and os.path.exists(configured):
        return configured
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@asynccontextmanager
async def http_server(app: Any) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a free loopback port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@dataclass
class Frame:
    """One SSE message as it came over the wire (comments are heartbeats)."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    comments: list[str] = field(default_factory=list)


async def read_frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """Parse `text/event-stream` line by line (as a browser does), yielding each message."""
    frame = Frame()
    async for line in response.aiter_lines():
        if line == "":
            if frame.data or frame.id is not None or frame.event != "message" or frame.comments:
                yield frame
            frame = Frame()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            frame.comments.append(value)
        elif name == "event":
            frame.event = value
        elif name == "data":
            frame.data = f"{frame.data}\n{value}" if frame.data else value
        elif name == "id":
            frame.id = value


class Parcel(msgspec.Struct):
    parcel_id: str


class Shipping:
    """A service whose handler rejects parcels until it is 'fixed' (a deploy, in life)."""

    def __init__(self) -> None:
        self.fixed = False
        self.handled: list[str] = []
        self.service = Service("shipping", version="2.1.0", description="Ships parcels")

        @self.service.rpc("quote")
        async def quote(req: Parcel) -> int:
            return len(req.parcel_id)

        @self.service.subscribe("parcel.shipped.v1", max_deliver=1)
        async def on_shipped(event: Parcel, ctx: Context) -> None:
            if not self.fixed:
                raise Reject(f"cannot ship {event.parcel_id} yet")
            self.handled.append(event.parcel_id)
