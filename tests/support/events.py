"""Event structs that several test modules publish and handle."""

from __future__ import annotations

import msgspec

# No docstrings on these: a docstring is part of a struct's JSON schema, which services
# compare (a subprocess's copy of a struct must have the same schema as the test's).


class OrderCreated(msgspec.Struct):  # the tests' order.created.v1: enough to charge it
    order_id: str
    amount_cents: int
