"""Typed errors: what a handler raises, the caller catches, as the same class.

Errors cross the wire as NATS service API (ADR-32) headers, so the caller never waits
for a timeout to learn that something went wrong, and never sees a traceback:

- `NotFound` (404) raised by the handler;
- `BadRequest` (400) from a payload that does not match the request type;
- `ServiceError(409, ...)`: any code a handler chooses;
- a bug in the handler: 500 with an error id to look up in the service's log;
- `NotFound` for an endpoint the service does not have, `NoResponders` (503) when
  no service answers the subject at all.

Run: `python examples/typed_errors.py`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from framework import Context, NotFound, Service, ServiceError, configure_logging, connect


class GetAccount(msgspec.Struct):
    account_id: int


class Account(msgspec.Struct):
    account_id: int
    owner: str


accounts = Service("accounts", version="1.0.0", description="Looks up accounts")
KNOWN = {1: Account(1, "ada")}


@accounts.rpc("get")
async def get(req: GetAccount, ctx: Context) -> Account:
    if req.account_id == 2:
        raise ServiceError(409, "account 2 is being migrated, try again later")
    if req.account_id == 3:
        raise ZeroDivisionError("a bug")
    account = KNOWN.get(req.account_id)
    if account is None:
        raise NotFound(f"no account {req.account_id}")
    return account


async def attempt(client: Any, subject: str, payload: object) -> None:
    try:
        account = await client.call(subject, payload, returns=Account, timeout=2.0)
        print(f"{subject} {payload}: ok, owner {account.owner}")
    except ServiceError as error:
        print(f"{subject} {payload}: {type(error).__name__} {error.code}: {error.message}")


async def run() -> None:
    async with accounts.serve(), connect() as client:
        await attempt(client, "accounts.get", GetAccount(1))
        await attempt(client, "accounts.get", GetAccount(404))
        await attempt(client, "accounts.get", {"account_id": "not a number"})
        await attempt(client, "accounts.get", GetAccount(2))
        await attempt(client, "accounts.get", GetAccount(3))
        await attempt(client, "accounts.delete", GetAccount(1))
        await attempt(client, "ledger.get", GetAccount(1))


def main() -> None:
    configure_logging(level="CRITICAL")  # the 500's traceback goes to the log; keep it quiet
    asyncio.run(run())


if __name__ == "__main__":
    main()
