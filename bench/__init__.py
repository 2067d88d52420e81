"""Benchmarks of the framework against raw nats-py, run side by side on one server.

`python -m bench.rpc` (request-reply). Results go to `bench/results.json`, one key per
benchmark; `bench.common` holds what every benchmark shares.
"""
