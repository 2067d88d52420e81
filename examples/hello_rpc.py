"""Hello, RPC: a typed request-reply endpoint, served and called in one program.

The handler's annotations are the contract: `Greet` is decoded from the request's
JSON, the returned `Greeting` is encoded into the reply. The endpoint's subject is
`<service>.<endpoint>`, here `greeter.hello`, so any NATS client can call it:

    nats request greeter.hello '{"name": "world"}'

Run: `python examples/hello_rpc.py` (NATS from NATS_URL, default nats://127.0.0.1:4222).
"""

from __future__ import annotations

import asyncio

import msgspec

from framework import Context, Service, configure_logging, connect


class Greet(msgspec.Struct):
    name: str


class Greeting(msgspec.Struct):
    text: str
    served_by: str


greeter = Service("greeter", version="1.0.0", description="Says hello")


@greeter.rpc("hello")
async def hello(req: Greet, ctx: Context) -> Greeting:
    ctx.log.info("greeting", name=req.name)
    return Greeting(text=f"Hello, {req.name}!", served_by=ctx.service)


async def run() -> None:
    async with greeter.serve(), connect() as client:
        reply = await client.call("greeter.hello", Greet("world"), returns=Greeting)
        print(f"{reply.text} (served by {reply.served_by})")


def main() -> None:
    configure_logging(level="WARNING")
    asyncio.run(run())


if __name__ == "__main__":
    main()
