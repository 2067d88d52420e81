"""Events fan out: every subscribing service gets every event, at least once.

`@service.subscribe(type)` creates one durable JetStream consumer per service and
handler. Two services subscribed to `user.signed_up.v1` each get all events (fan-out);
replicas of one service would share their consumer (load balancing). `publish` returns
once JetStream has stored the event, so nothing published is lost if no one listens yet.

Run: `python examples/events_fanout.py`.
"""

from __future__ import annotations

import asyncio
import uuid

import msgspec

from framework import Context, Service, configure_logging, connect


class UserSignedUp(msgspec.Struct):
    user_id: str
    email: str


welcome = Service("welcome", description="Sends welcome mails")
audit = Service("audit", description="Keeps an audit trail")
expected: set[str] = set()  # this run's users
seen: dict[str, set[str]] = {"welcome": set(), "audit": set()}
everyone_got_all = asyncio.Event()


def arrived(service: str, user_id: str) -> None:
    seen[service].add(user_id)
    if all(expected <= got for got in seen.values()):
        everyone_got_all.set()


@welcome.subscribe("user.signed_up.v1")
async def send_welcome(event: UserSignedUp, ctx: Context) -> None:
    arrived("welcome", event.user_id)
    print(f"welcome: mail to {event.email} (event {ctx.event_id})")


@audit.subscribe("user.signed_up.v1")
async def record(event: UserSignedUp, ctx: Context) -> None:
    arrived("audit", event.user_id)
    print(f"audit:   {event.user_id} signed up")


async def run() -> None:
    users = [f"u-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    expected.update(users)
    async with welcome.serve(), audit.serve(), connect() as client:
        for user in users:
            ack = await client.publish(
                "user.signed_up.v1", UserSignedUp(user, f"{user}@example.com")
            )
            print(f"published {user}: stored as {ack.stream} #{ack.seq}")
        async with asyncio.timeout(10):
            await everyone_got_all.wait()
    print(f"each service got all {len(users)} events")


def main() -> None:
    configure_logging(level="WARNING")
    asyncio.run(run())


if __name__ == "__main__":
    main()
