"""JSON encoding with msgspec, cached per type so no message pays for reflection."""

from __future__ import annotations

import functools
import json
from typing import Any

import msgspec

__all__ = ["decode", "decoder_for", "encode", "schema_json"]

_encoder = msgspec.json.Encoder()
encode = _encoder.encode


@functools.cache
def decoder_for(tp: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(tp)


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
