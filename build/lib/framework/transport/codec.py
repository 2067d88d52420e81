"""JSON encoding with msgspec, cached per type so no message pays for reflection."""

from __future__ import annotations

import functools
import json
from typing import Any

import msgspec

__all__ = ["DECODE_ERRORS", "decode", "decoder_for", "encode", "encode_payload", "schema_json"]

# What decoding untrusted bytes can raise besides msgspec's own errors: invalid UTF-8
# inside a JSON string, and nesting deep enough to exhaust the recursion limit.
DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError)

_encoder = msgspec.json.Encoder()
encode = _encoder.encode


@functools.cache
def decoder_for(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


def encode_payload(payload: Any) -> bytes:
    """Bytes pass through untouched; None is an empty body; anything else is JSON."""
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    return encode(payload)


def decode(data: bytes, tp: Any) -> Any:
    return decoder_for(tp).decode(data)


@functools.cache
def schema_json(tp: Any) -> str:
    """ADR-32 metadata values are strings, so the JSON schema travels JSON-encoded."""
    try:
        schema = msgspec.json.schema(tp)
    except (TypeError, ValueError):
        schema = {}
    return json.dumps(schema, separators=(",", ":"), sort_keys=True)
