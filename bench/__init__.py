"""Benchmarks of the framework against raw nats-py, run side by side on one server.

`python -m bench` (what `just bench` runs) runs them all and prints one table;
`python -m bench.rpc`, `bench.events` and `bench.memory` run one each. Results go to
`bench/results.json`, one key per benchmark; `bench.common` holds what they share.
"""
