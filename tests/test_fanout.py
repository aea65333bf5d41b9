"""The fan-out worker against a real Redis: acks, redelivery, claims, poison entries."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from streamd import keys
from streamd.cursors import parse_entry_id
from streamd.fanout import FanoutWorker
from streamd.settings import Settings
from tests.helpers import Api


async def ingest(redis: aioredis.Redis, author: str, text: str, events: list[str] | None = None) -> str:
    body = orjson.dumps({"text": text, "events": events or [], "media": []})
    entry_id: bytes = await redis.xadd(keys.ingest_stream(), {"a": author, "d": body})
    return entry_id.decode()


async def feed_post_ids(redis: aioredis.Redis, feed: str) -> list[str]:
    entries = await redis.xrange(keys.feed_stream(feed))
    return [fields[b"pid"].decode() for _, fields in entries]


async def test_entry_written_to_every_feed_then_acked(redis: aioredis.Redis, settings: Settings) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    post_id = await ingest(redis, "alice", "hello", ["derby-2026", "oaks"])
    assert await worker.step() == 1
    for feed in ("user:alice", "event:derby-2026", "event:oaks"):
        assert await feed_post_ids(redis, feed) == [post_id]
    pending = await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP)
    assert pending["pending"] == 0


async def test_posts_accepted_before_any_worker_are_fanned_out(redis: aioredis.Redis, settings: Settings) -> None:
    early = await ingest(redis, "bob", "before the group existed")
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    assert await worker.step() == 1
    assert await feed_post_ids(redis, "user:bob") == [early]


async def test_worker_killed_between_feed_writes_and_ack(
    redis: aioredis.Redis, settings: Settings, start_server: Any, session: Any
) -> None:
    """A worker dies after writing the feeds and before acking; another claims the
    entries; every post ends up in each feed exactly once, and a live subscriber
    receives each exactly once."""
    srv = await start_server(settings, with_worker=False)
    api = Api(session, str(srv.make_url("")).rstrip("/"))
    ws = await session.ws_connect(srv.make_url("/v1/ws"))
    for feed in ("user:carol", "event:race-1"):
        await ws.send_json({"op": "subscribe", "feed": feed})
        assert (await ws.receive_json(timeout=10))["op"] == "subscribed"

    token = await api.user("carol")
    posts = [await api.post(token, f"p{i}", events=["race-1"]) for i in range(5)]

    doomed = FanoutWorker(redis, settings, consumer="doomed")
    await doomed.ensure_group()
    entries = (await redis.xreadgroup(keys.FANOUT_GROUP, "doomed", {keys.ingest_stream(): ">"}, count=100))[0][1]
    assert len(entries) == 5
    # Half the work, then death: feeds written for the first three, no ack at all.
    await doomed.write_feeds(entries[:3])
    del doomed

    rescuer = FanoutWorker(redis, settings.replace(claim_idle_ms=50), consumer="rescuer")
    claimed = 0
    while claimed < 5:  # the entries become claimable once idle for 50 ms
        claimed += await rescuer.claim_stale()
    ids = [p["id"] for p in posts]
    assert await feed_post_ids(redis, "user:carol") == ids
    assert await feed_post_ids(redis, "event:race-1") == ids
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0

    received: dict[str, list[str]] = {"user:carol": [], "event:race-1": []}
    while sum(map(len, received.values())) < 10:
        frame = await ws.receive_json(timeout=10)
        received[frame["feed"]].append(frame["post"]["id"])
    assert received == {"user:carol": ids, "event:race-1": ids}
    marker = await api.post(token, "marker")
    await rescuer.step()
    frame = await ws.receive_json(timeout=10)
    assert frame["post"]["id"] == marker["id"]  # no duplicate was queued before it
    await ws.close()


async def test_redelivered_entry_is_not_written_twice(redis: aioredis.Redis, settings: Settings) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    post_id = await ingest(redis, "dan", "once")
    entries = (await redis.xreadgroup(keys.FANOUT_GROUP, "w", {keys.ingest_stream(): ">"}))[0][1]
    await worker.write_feeds(entries)
    await worker.write_feeds(entries)
    await worker.process(entries)
    assert await feed_post_ids(redis, "user:dan") == [post_id]


async def test_poison_entry_goes_to_dead_letters(redis: aioredis.Redis, settings: Settings) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    await redis.xadd(keys.ingest_stream(), {"a": "eve", "d": b"{not json"})
    good = await ingest(redis, "eve", "fine")
    assert await worker.step() == 2
    dead = await redis.xrange(keys.dead_letter_stream())
    assert len(dead) == 1 and b"unparseable" in dead[0][1][b"reason"]
    assert await feed_post_ids(redis, "user:eve") == [good]
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0


async def test_history_is_bounded_and_trimming_is_recorded(redis: aioredis.Redis, settings: Settings) -> None:
    worker = FanoutWorker(redis, settings.replace(feed_history_len=10))
    await worker.ensure_group()
    ids = [await ingest(redis, "fay", f"p{i}") for i in range(30)]
    while await worker.step():
        pass
    kept = await feed_post_ids(redis, "user:fay")
    assert 10 <= len(kept) <= 11 and kept == ids[-len(kept) :]
    trimmed = parse_entry_id(await redis.hget(keys.feed_meta("user:fay"), "trimmed"))
    first_kept = parse_entry_id((await redis.xrange(keys.feed_stream("user:fay"), count=1))[0][0])
    assert trimmed < first_kept
    assert await redis.hlen(keys.feed_index("user:fay")) == len(kept)


async def test_ingest_stream_is_trimmed_once_processed(redis: aioredis.Redis, settings: Settings) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    for i in range(50):
        await ingest(redis, "gil", f"p{i}")
    await worker.step()
    await worker.trim_ingest()
    # Everything before the last delivered entry goes (MINID keeps that one).
    assert await redis.xlen(keys.ingest_stream()) == 1
    last = await ingest(redis, "gil", "new")
    await worker.step()
    assert last in await feed_post_ids(redis, "user:gil")


async def test_entry_that_redis_refuses_goes_to_dead_letters(redis: aioredis.Redis, settings: Settings) -> None:
    """A feed key of the wrong type makes the script fail for that entry only."""
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    await redis.set(keys.feed_stream("event:broken"), "not a stream")
    bad = await ingest(redis, "hal", "tagged with a broken feed", ["broken"])
    good = await ingest(redis, "ivy", "fine")
    assert await worker.step() == 2
    dead = await redis.xrange(keys.dead_letter_stream())
    assert [d[1][b"entry"].decode() for d in dead] == [bad]
    assert b"refused" in dead[0][1][b"reason"]
    assert await feed_post_ids(redis, "user:ivy") == [good]
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0
