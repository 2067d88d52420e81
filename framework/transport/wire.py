"""Messages onto a nats-py connection without nats-py's publish path.

nats-py encodes headers byte by byte (a regex match, two strips, a translate and two
encodes per header) and passes every message through four coroutines: 2 us for one
header, 7 us for the five of an event, more than the rest of a small call costs. Here
the header block is one string joined and encoded once, exactly the bytes nats-py
would send (tests/test_header_encoding.py compares them on random input), and the
`PUB`/`HPUB` command is appended to the connection's pending buffer as nats-py's
`_send_command` does, waking its flusher the same way.

The fast path is taken only while the connection is up and has room in its pending
buffer; anything else (reconnecting, draining, closed, a full buffer, a payload over
`max_payload`, a nats-py without these internals) goes through `nc.publish`, which
raises or buffers as nats-py does.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import structlog
from nats.errors import BadHeaderError, NotJSMessageError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

_log = structlog.get_logger("framework.transport.wire")

__all__ = [
    "HEADER_LINE",
    "PROGRESS",
    "ack",
    "ack_all_now",
    "ack_now",
    "command",
    "fast_path",
    "header_block",
    "publish",
    "publish_now",
    "queue",
    "subscribe_inline",
    "write_now",
]

HEADER_LINE = "NATS/1.0\r\n"
# nats-py's rules (`Client._send_publish`): keys are HTTP tokens, stripped; values are
# stripped and their CR/LF become spaces (no header or protocol injection).
_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_keys: dict[str, str] = {}  # key as given -> as sent ("" to skip); a few distinct keys
_MAX_KEYS = 1024
_INTERNALS = ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue", "stats")


def _key(name: str) -> str:
    key = _keys.get(name)
    if key is None:
        key = name.strip()
        if key and not _KEY.fullmatch(key):
            raise BadHeaderError(key)
        if len(_keys) < _MAX_KEYS:
            _keys[name] = key
    return key


def header_block(headers: Mapping[str, str]) -> bytes:
    """`NATS/1.0\\r\\n`, a `Name: value\\r\\n` line per header, `\\r\\n`: what nats-py sends."""
    lines = [HEADER_LINE]
    for name, value in headers.items():
        key = _key(name)
        if not key:
            continue  # nats-py skips empty keys
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        lines.append(f"{key}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def fast_path(nc: NATS) -> bool:
    """Whether this nats-py has the internals `publish` appends to (else: `nc.publish`)."""
    return all(hasattr(nc, name) for name in _INTERNALS)


def command(subject: str, data: bytes, reply: str = "", block: bytes | None = None) -> bytes:
    """The `PUB` (or, with a header block, `HPUB`) command of one message."""
    if block is None:
        return b"".join([f"PUB {subject} {reply} {len(data)}\r\n".encode(), data, b"\r\n"])
    size = len(block)
    head = f"HPUB {subject} {reply} {size} {size + len(data)}\r\n".encode()
    return b"".join([head, block, data, b"\r\n"])


async def publish(
    nc: NATS, subject: str, data: bytes, reply: str = "", block: bytes | None = None
) -> None:
    """Send one message: `block` is an encoded header block (`header_block`) or None.

    `subject` and `reply` must be valid subjects (the framework's callers check theirs
    or got them from the server): unlike `nc.publish`, nothing is checked here.
    """
    if not queue(nc, [command(subject, data, reply, block)], len(data)):
        headers = None if block is None else _parse_block(block)
        await nc.publish(subject, data, reply=reply, headers=headers)


def publish_now(
    nc: NATS, subject: str, data: bytes, reply: str = "", block: bytes | None = None
) -> bool:
    """`publish` without awaiting: True once queued, False when only the awaited
    `publish` may send it (then nothing was sent)."""
    return queue(nc, [command(subject, data, reply, block)], len(data))


async def ack(msg: Msg, payload: bytes = b"") -> None:
    """nats-py's `msg.ack()` (or, with a `payload`: `-NAK`, `+TERM`, `+WPI`) for less."""
    if not ack_now(msg, payload):
        await msg._client.publish(msg.reply, payload)
        if payload != PROGRESS:
            msg._ackd = True


def ack_now(msg: Msg, payload: bytes = b"") -> bool:
    """`ack` without awaiting: True once queued (False: nothing sent). Raises as
    nats-py does for a message without a reply subject, or one acked already (an
    in-progress ack may be repeated)."""
    if payload == PROGRESS:
        if not msg.reply:
            raise NotJSMessageError
    else:
        msg._check_reply()
    if not queue(msg._client, [command(msg.reply, payload)], len(payload)):
        return False
    if payload != PROGRESS:
        msg._ackd = True
    return True


def ack_all_now(msgs: list[Msg]) -> bool:
    """`ack_now` for several messages of one connection, queued together: all of
    them, or none (False)."""
    if not msgs:
        return True
    for msg in msgs:
        msg._check_reply()
    if not queue(msgs[0]._client, [command(msg.reply, b"") for msg in msgs], 0):
        return False
    for msg in msgs:
        msg._ackd = True
    return True


PROGRESS = b"+WPI"


def queue(nc: Any, commands: list[bytes], payload_size: int) -> bool:
    """Append `commands` to the pending buffer and wake the flusher, as nats-py's
    `_send_command` and `_flush_pending` do: all of them, or none (False) when only
    `nc.publish` may send them (reconnecting, draining, a full buffer, a payload over
    `max_payload`, a nats-py without these internals)."""
    try:
        if not nc.is_connected or nc.is_draining_pubs or payload_size > nc.max_payload:
            return False
        size = nc._pending_data_size + sum(len(c) for c in commands)
        if 0 < nc._max_pending_size < size:
            return False  # nats-py flushes synchronously first
        flusher = nc._flusher_task
        flush_queue = nc._flush_queue
        if flusher is None or flusher.done() or flush_queue is None:
            return False
        nc._pending.extend(commands)
        nc._pending_data_size = size
        stats = nc.stats
        stats["out_msgs"] += len(commands)
        stats["out_bytes"] += payload_size
        if flush_queue.empty():
            flush_queue.put_nowait(flusher.get_loop().create_future())
        return True
    except AttributeError:  # a nats-py without these internals
        return False


def write_now(nc: NATS) -> None:
    """Write what is pending on the connection now, in this task step, instead of in
    the flusher's next one: for a request on the critical path of a pipeline (one
    event-loop iteration less per round trip). What nats-py does itself when its
    flusher is gone; the flusher's next turn then finds nothing to write (and waits
    for the transport to drain as usual)."""
    try:
        transport = nc._transport
        if not nc.is_connected or not nc._pending or transport is None:
            return
        pending, nc._pending = nc._pending, []
        nc._pending_data_size = 0
        transport.writelines(pending)
    except AttributeError:  # a nats-py without these internals: the flusher writes
        return


def _parse_block(block: bytes) -> dict[str, str]:
    """The headers of an encoded block, for the `nc.publish` fallback."""
    out: dict[str, str] = {}
    for line in block.decode()[len(HEADER_LINE) :].split("\r\n"):
        name, sep, value = line.partition(": ")
        if sep:
            out[name] = value
    return out


class _Inline:
    """Stands where nats-py keeps a request's future on a subscription (`future=`):
    nats-py then hands each message to `set_result` from its read loop, with no queue
    and no task in between."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[Msg], None]) -> None:
        self._callback = callback

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        try:
            self._callback(msg)
        except Exception as exc:  # never into nats-py's read loop: it would drop the link
            _log.error("message callback failed", error=repr(exc), exc_info=exc)


async def subscribe_inline(nc: NATS, subject: str, callback: Callable[[Msg], None]) -> Subscription:
    """Subscribe with a callback that runs as each message is read: for callbacks
    that only resolve futures or count (they must not block). A subscription
    callback otherwise costs a queue put, a task wake-up and a loop iteration per
    message. nats-py versions without `future=` get an ordinary callback."""
    if "future" in inspect.signature(nc.subscribe).parameters:
        inline = cast("Any", _Inline(callback))
        return await nc.subscribe(subject, future=inline)

    async def call(msg: Msg) -> None:
        callback(msg)

    return await nc.subscribe(subject, cb=cast("Callable[[Msg], Awaitable[None]]", call))
