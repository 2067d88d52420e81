"""Processed-ids and response-cache buckets against a real JetStream server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from nats.errors import NoRespondersError
from nats.js import api

from framework.events.idempotency import BATCH_KEYS, ProcessedIds, ResponseCache, kv_key
from framework.testing import eventually


async def _open(client, handler: str = "handle") -> ProcessedIds:
    return await ProcessedIds.open(client, "svc", handler, ttl=3600)


def _requests(processed: ProcessedIds) -> int:
    assert processed._mux is not None
    return processed._mux.requests


def _in_flight(processed: ProcessedIds) -> int:
    assert processed._mux is not None
    return len(processed._mux._pending)


async def test_seen_mark_round_trip_on_a_direct_bucket(client):
    processed = await _open(client)
    info = await client.js.stream_info("KV_processed_svc_handle")
    assert info.config.allow_direct is True
    assert processed.direct and processed.batched
    assert await processed.seen("e-1") is False
    await processed.mark("e-1")
    assert await processed.seen("e-1") is True
    assert await processed.seen("e-2") is False
    entry = await processed._kv.get("e-1")  # stored where the KV API finds it
    assert entry.value == b"1"
    assert _in_flight(processed) == 0


async def test_concurrent_seen_calls_share_few_batched_requests(client):
    processed = await _open(client)
    ids = [f"evt-{i}" for i in range(500)]
    marked = {ids[i] for i in range(0, 500, 3)}
    await asyncio.gather(*(processed.mark(i) for i in marked))
    await processed._kv.put(kv_key(ids[1]), b"x")  # written by someone else: also seen
    marked.add(ids[1])

    before = _requests(processed)
    results = await asyncio.gather(*(processed.seen(i) for i in ids))
    assert results == [i in marked for i in ids]
    batches = _requests(processed) - before
    assert batches == -(-500 // BATCH_KEYS)  # 2 multi_last requests for 500 keys
    assert processed.batched
    assert _in_flight(processed) == 0

    # The same id several times in one iteration: one subject, every caller answered.
    before = _requests(processed)
    again = await asyncio.gather(*(processed.seen(i) for i in [ids[0], ids[0], ids[2], ids[0]]))
    assert again == [True, True, False, True]
    assert _requests(processed) - before == 1


async def test_a_deleted_or_purged_key_is_not_seen(client):
    processed = await _open(client)
    for event_id in ("gone", "purged", "kept", "back"):
        await processed.mark(event_id)
    await processed._kv.delete("gone")
    await processed._kv.purge("purged")
    await processed._kv.delete("back")
    await processed.mark("back")
    got = await asyncio.gather(*(processed.seen(i) for i in ("gone", "purged", "kept", "back")))
    assert got == [False, False, True, True]
    processed.batched = False  # the key-by-key path reads markers the same way
    got = await asyncio.gather(*(processed.seen(i) for i in ("gone", "purged", "kept", "back")))
    assert got == [False, False, True, True]


async def test_ids_that_need_hashing(client):
    processed = await _open(client)
    odd = ["order.created:42", "a b", "ünïcode", "x" * 129, "$KV.*.>"]
    assert all(kv_key(i).startswith("h_") for i in odd)
    for event_id in odd[:3]:
        await processed.mark(event_id)
    assert await asyncio.gather(*(processed.seen(i) for i in odd)) == [
        True,
        True,
        True,
        False,
        False,
    ]
    entry = await processed._kv.get(kv_key("a b"))
    assert entry.value == b"1"


async def test_batched_requests_fall_back_to_key_by_key_on_an_old_server(client):
    """A server before 2.11 answers `multi_last` with `408 Empty Request`: simulated by
    a responder in front of the real direct get API."""
    processed = await _open(client)
    await processed.mark("a")
    await processed.mark("d")
    await processed._kv.delete("d")
    nc = client.nc
    real = processed._direct_get

    async def old_server(msg):
        if msg.subject == "old.api":  # the batched form: refused
            await nc.publish(
                msg.reply, b"", headers={"Status": "408", "Description": "Empty Request"}
            )
            return
        answer = await nc.request(real + msg.subject[len("old.api") :], b"", timeout=2)
        await nc.publish(msg.reply, answer.data, headers=answer.headers)

    await nc.subscribe("old.api", cb=old_server)
    await nc.subscribe("old.api.>", cb=old_server)
    await nc.flush()
    processed._direct_get = "old.api"

    before = _requests(processed)
    got = await asyncio.gather(*(processed.seen(i) for i in ("a", "b", "d", "a")))
    assert got == [True, False, False, True]
    assert processed.batched is False  # for good
    assert _requests(processed) - before == 1 + 3  # the refused batch, then one per key
    before = _requests(processed)
    assert await asyncio.gather(processed.seen("a"), processed.seen("c")) == [True, False]
    assert _requests(processed) - before == 2  # no batch tried again


async def test_forced_key_by_key_path_is_correct(client):
    processed = await _open(client)
    processed.batched = False
    ids = [f"k{i}" for i in range(40)]
    await asyncio.gather(*(processed.mark(i) for i in ids[::2]))
    before = _requests(processed)
    assert await asyncio.gather(*(processed.seen(i) for i in ids)) == [
        n % 2 == 0 for n in range(40)
    ]
    assert _requests(processed) - before == 40
    assert _in_flight(processed) == 0


async def test_a_stopped_server_raises_instead_of_hanging(client, nats_server):
    processed = await _open(client)
    await processed.mark("before")
    processed.timeout = 0.5
    nats_server.stop()
    started = time.monotonic()
    results = await asyncio.gather(
        *(processed.seen(f"x{i}") for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, TimeoutError) for r in results), results
    with pytest.raises(TimeoutError):
        await processed.mark("after")
    processed.batched = False
    with pytest.raises(TimeoutError):
        await processed.seen("before")
    assert time.monotonic() - started < 5
    assert _in_flight(processed) == 0  # nothing left behind by the failures

    nats_server.start()  # back on the same port and store: the markers are still there
    processed.timeout = 5.0
    await eventually(lambda: client.nc.is_connected, what="reconnected")
    processed.batched = True
    assert await asyncio.gather(processed.seen("before"), processed.seen("x0")) == [True, False]


async def test_a_deleted_bucket_fails_every_caller(client):
    processed = await _open(client)
    await client.js.delete_key_value("processed_svc_handle")
    results = await asyncio.gather(
        *(processed.seen(f"x{i}") for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(r, NoRespondersError) for r in results), results
    assert len({id(r) for r in results}) == 10  # each caller raises its own exception
    with pytest.raises(NoRespondersError):
        await processed.mark("x")


async def test_a_cancelled_caller_does_not_disturb_the_batch(client):
    processed = await _open(client)
    await processed.mark("m")
    loop = asyncio.get_running_loop()
    doomed = loop.create_task(processed.seen("m"))
    others = [loop.create_task(processed.seen(i)) for i in ("m", "n")]
    await asyncio.sleep(0)  # all queued, the flush scheduled
    doomed.cancel()
    assert await asyncio.gather(*others) == [True, False]
    assert doomed.cancelled()
    assert await processed.seen("m") is True


async def test_buckets_of_one_client_share_one_inbox_subscription(client):
    first, second = await _open(client, "a"), await _open(client, "b")
    assert first._mux is second._mux
    await first.mark("e")
    assert await asyncio.gather(first.seen("e"), second.seen("e")) == [True, False]


async def test_a_bucket_created_without_direct_get_still_works(client):
    await client.js.create_key_value(api.KeyValueConfig(bucket="processed_svc_old", history=1))
    processed = await _open(client, "old")
    assert processed.direct is False
    assert await processed.seen("e") is False
    await processed.mark("e")
    assert await asyncio.gather(processed.seen("e"), processed.seen("f")) == [True, False]


async def test_response_cache(client):
    cache = await ResponseCache.open(client, "svc", "charge")
    assert await cache.get("k-1") is None
    await cache.put("k-1", b'{"ok":true}')
    await cache.put("key with spaces", b"")
    assert await cache.get("k-1") == b'{"ok":true}'
    assert await cache.get("key with spaces") == b""
    info = await client.js.stream_info("KV_responses_svc_charge")
    assert info.config.allow_direct is True


async def test_a_batch_the_server_cuts_short_is_continued(client):
    """The server may end a batch early (`204 EOB` with `Nats-Num-Pending` > 0): the keys
    not returned yet are asked for again. Forced with the API's own `batch` limit."""
    processed = await _open(client)
    ids = [f"c{i}" for i in range(7)]
    for event_id in ids[:5]:
        await processed.mark(event_id)
    await processed._kv.delete("c1")
    nc = client.nc
    real = processed._direct_get
    relay_inbox = nc.new_inbox()
    requesters: dict[str, str] = {}
    eobs: list[dict[str, str]] = []

    async def relay_back(msg):
        headers = dict(msg.headers or {})
        if headers.get("Status") == "204":
            eobs.append(headers)
        await nc.publish(requesters[msg.subject], msg.data, headers=headers)

    async def cutting_server(msg):
        request = json.loads(msg.data)
        request["batch"] = 2
        token = f"{relay_inbox}.{len(requesters)}"
        requesters[token] = msg.reply
        await nc.publish(real, json.dumps(request).encode(), reply=token)

    await nc.subscribe(f"{relay_inbox}.*", cb=relay_back)
    await nc.subscribe("cut.api", cb=cutting_server)
    await nc.flush()
    processed._direct_get = "cut.api"

    before = _requests(processed)
    got = await asyncio.gather(*(processed.seen(i) for i in ids))
    assert got == [True, False, True, True, True, False, False]
    assert processed.batched
    assert _requests(processed) - before == len(requesters) == 3  # 5 messages, 2 at a time
    assert [e["Nats-Num-Pending"] for e in eobs] == ["3", "1", "0"]


def _replies(processed: ProcessedIds) -> int:
    assert processed._mux is not None
    return processed._mux.replies


async def _stream_config(client, stream: str) -> dict:
    reply = await client.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
    return json.loads(reply.data)["config"]


async def _update_stream(client, config: dict) -> None:
    name = config["name"]
    reply = await client.nc.request(
        f"$JS.API.STREAM.UPDATE.{name}", json.dumps(config).encode(), timeout=2
    )
    assert "error" not in json.loads(reply.data), reply.data


async def test_mark_all_stores_the_markers_as_one_fast_ingest_batch(client):
    processed = await _open(client)
    assert processed.fast
    assert (await _stream_config(client, "KV_processed_svc_handle"))["allow_batched"] is True
    ids = [f"evt-{i}" for i in range(100)]

    before = _replies(processed)
    assert await processed.mark_all(ids) == [None] * 100
    # the batch's first message and its commit are answered, not the 98 between them
    assert _replies(processed) - before == 2
    assert all(await asyncio.gather(*(processed.seen(i) for i in ids)))
    info = await client.js.stream_info("KV_processed_svc_handle")
    assert info.state.messages == 100

    before = _replies(processed)
    await processed.mark("evt-alone")
    assert _replies(processed) - before == 1  # a batch of one: its commit
    assert await processed.seen("evt-alone")
    assert processed.fast and _in_flight(processed) == 0


async def test_marks_fall_back_to_one_pub_ack_each_where_fast_ingest_is_off(client):
    processed = await _open(client)
    config = await _stream_config(client, "KV_processed_svc_handle")
    config["allow_batched"] = False
    await _update_stream(client, config)
    if (await _stream_config(client, "KV_processed_svc_handle")).get("allow_batched"):
        pytest.skip("this nats-server does not switch fast ingest off again")

    before = _replies(processed)
    assert await processed.mark_all([f"evt-{i}" for i in range(10)]) == [None] * 10
    assert not processed.fast  # refused once, then never tried again
    # the refusal (the server answers each message of the batch), then one PubAck each
    assert _replies(processed) - before >= 1 + 10
    assert all(await asyncio.gather(*(processed.seen(f"evt-{i}") for i in range(10))))
    before = _replies(processed)
    assert await processed.mark_all([f"evt-b{i}" for i in range(5)]) == [None] * 5
    assert _replies(processed) - before == 5
    assert _in_flight(processed) == 0


async def test_a_fast_batch_the_stream_refuses_in_part_reports_each_mark(client):
    processed = await _open(client)
    await processed.mark_all([f"old-{i}" for i in range(3)])
    config = await _stream_config(client, "KV_processed_svc_handle")
    config["max_msgs"] = 5  # two more fit; discard "new" refuses the rest
    config["discard"] = "new"
    await _update_stream(client, config)

    ids = [f"evt-{i}" for i in range(6)]
    results = await processed.mark_all(ids)
    stored = [i for i, r in zip(ids, results, strict=True) if r is None]
    refused = [r for r in results if r is not None]
    assert len(stored) == 2 and len(refused) == 4
    assert all("maximum messages" in str(r).lower() for r in refused), refused
    assert all(await asyncio.gather(*(processed.seen(i) for i in stored)))
    assert processed.fast  # a refused message is not a server without fast ingest
    assert _in_flight(processed) == 0


async def test_a_bucket_created_without_fast_ingest_is_used_as_it_is(client):
    await client.js.create_key_value(
        api.KeyValueConfig(bucket="processed_svc_older", history=1, direct=True)
    )
    processed = await _open(client, "older")
    assert not processed.fast
    assert not (await _stream_config(client, "KV_processed_svc_older")).get("allow_batched")

    before = _replies(processed)
    assert await processed.mark_all([f"evt-{i}" for i in range(4)]) == [None] * 4
    assert _replies(processed) - before == 4  # one PubAck each
    assert all(await asyncio.gather(*(processed.seen(f"evt-{i}") for i in range(4))))
