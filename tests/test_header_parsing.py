"""The framework's header parser: nats-py's result, byte for byte, on hostile input."""

from __future__ import annotations

import asyncio
import random

import pytest
from nats.aio.client import Client as NATS

from framework.transport.headers import install_header_parser, parse_header_block

nats_py_parse = getattr(NATS, "_parse_header_lines", None)
needs_nats_py_parser = pytest.mark.skipif(
    nats_py_parse is None, reason="this nats-py parses headers another way"
)

# pieces that stress the parser: separators, ASCII and Unicode whitespace, bytes that
# are not UTF-8, truncated sequences, NUL
PIECES = [
    b"a", b"B", b"-", b":", b": ", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\x0b", b"\x0c",
    b"\x1c", b"\x1f", b"\x00", b"\xc3\xa9", b"\xc2\xa0", b"\xc2\x85", b"\xe2\x80", b"\xff",
    b"Nats-Msg-Id", b"\xe3\x80\x80",
]  # fmt: skip


@needs_nats_py_parser
def test_typical_event_headers_parse_as_nats_py_parses_them():
    raw = (
        b"Nats-Msg-Id: 4f1c2a\r\nCorrelation-Id: c-1\r\n"
        b"traceparent: 00-0123456789abcdef0123456789abcdef-0123456789abcdef-01\r\n"
        b"X-Odd:no-space\r\nX-Tab:\tvalue \r\n\r\n"
    )
    assert parse_header_block(raw) == nats_py_parse(raw)
    assert parse_header_block(raw)["X-Tab"] == "value"


@needs_nats_py_parser
def test_random_header_blocks_parse_as_nats_py_parses_them():
    rng = random.Random(20261122)
    for _ in range(50_000):
        raw = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 16)))
        assert parse_header_block(raw) == nats_py_parse(raw), raw


@needs_nats_py_parser
async def test_framework_connections_use_the_faster_parser(client):
    assert client.nc._parse_header_lines is parse_header_block
    received = []

    async def keep(msg):
        received.append(msg.headers)

    await client.nc.subscribe("hdr.test", cb=keep)
    await client.nc.publish("hdr.test", b"", headers={"Name": "caf\u00e9", "X-Id": "1"})
    await client.nc.flush()
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.01)
    assert received == [{"Name": "caf\u00e9", "X-Id": "1"}]


def test_event_time_is_what_datetime_formats():
    from datetime import UTC, datetime

    from framework.events.publish import rfc3339_millis

    rng = random.Random(7)
    stamps = [0.0, 1.0, 1763807825.123, 1763807825.9995, 1763807825.999999, 2**31 + 0.5]
    stamps += [rng.uniform(0, 4e9) for _ in range(20_000)]
    for stamp in stamps:
        expected = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
        assert rfc3339_millis(stamp) == expected.replace("+00:00", "Z"), stamp


def test_wire_size_counts_the_header_block_in_bytes():
    from framework.transport.headers import wire_size

    rng = random.Random(11)
    alphabet = ["a", "Z", "-", "0", "\u00e9", "\u4e2d", "\U0001f600", " "]
    for _ in range(2_000):
        headers = {
            "".join(rng.choice("abcXYZ-") for _ in range(rng.randint(1, 12))): "".join(
                rng.choice(alphabet) for _ in range(rng.randint(0, 20))
            )
            for _ in range(rng.randint(1, 6))
        }
        block = b"NATS/1.0\r\n"
        block += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
        assert wire_size(b"xyz", headers) == 3 + len(block)
    assert wire_size(b"xyz", None) == wire_size(b"xyz", {}) == 3


def test_the_parser_is_installed_only_where_nats_py_has_the_method():
    """A nats-py without `_parse_header_lines` keeps its own parsing, untouched."""

    class OtherClient:  # a nats-py release that parses headers another way
        def _parse_headers(self, raw: bytes) -> dict[str, str]:
            return {}

    other = OtherClient()
    assert install_header_parser(other) is False
    assert not hasattr(other, "_parse_header_lines")
    current = NATS()
    assert install_header_parser(current) is (nats_py_parse is not None)
