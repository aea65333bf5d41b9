"""The fan-out worker's batches against a real Redis: many posts of one feed in
one script call, deletes in the same batch, re-delivery, trimming, the run
loop over its own connection; and the batch plan as a pure function."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from streamd import keys
from streamd.fanout import MAX_CALL_ITEMS, FanoutWorker, Plan
from streamd.settings import Settings

Entry = tuple[bytes, dict[bytes, bytes]]


async def ingest(redis: aioredis.Redis, author: str, text: str, events: list[str] | None = None) -> str:
    body = orjson.dumps({"text": text, "events": events or [], "media": []})
    entry_id: bytes = await redis.xadd(keys.ingest_stream(), {"a": author, "d": body, "l": b"[]"})
    return entry_id.decode()


async def delete(redis: aioredis.Redis, post_id: str, feeds: list[str]) -> None:
    """The entry post_delete.lua appends."""
    await redis.xadd(keys.ingest_stream(), {"x": post_id, "f": orjson.dumps(feeds)})


async def read_all(redis: aioredis.Redis, consumer: str = "w") -> list[Entry]:
    reply = await redis.xreadgroup(keys.FANOUT_GROUP, consumer, {keys.ingest_stream(): ">"}, count=10_000)
    return reply[0][1] if reply else []


async def history(redis: aioredis.Redis, feed: str) -> list[tuple[str, str]]:
    """(kind, post id) of each history entry, oldest first."""
    entries = await redis.xrange(keys.feed_stream(feed))
    return [(fields[b"t"].decode(), fields[b"pid"].decode()) for _, fields in entries]


@pytest.fixture
async def live(redis_url: str) -> AsyncIterator[Any]:
    """Subscribe to feeds' channels; `take(n)` awaits the next n live messages (channel, entry id, frame)."""
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()

    class Live:
        async def subscribe(self, *feeds: str) -> None:
            await pubsub.subscribe(*(keys.feed_channel(f) for f in feeds))
            for _ in feeds:
                while (await pubsub.get_message(timeout=10))["type"] != "subscribe":
                    pass

        async def take(self, n: int) -> list[tuple[str, str, dict[str, Any]]]:
            out: list[tuple[str, str, dict[str, Any]]] = []
            while len(out) < n:
                message = await pubsub.get_message(timeout=10)
                assert message is not None, f"only {len(out)} of {n} live messages came"
                if message["type"] != "message":
                    continue
                entry_id, _, frame = message["data"].partition(b" ")
                out.append((keys.feed_of_channel(message["channel"].decode()), entry_id.decode(), orjson.loads(frame)))
            return out

        async def nothing_more(self) -> bool:
            return await pubsub.get_message(timeout=0.2) is None

    yield Live()
    await pubsub.aclose()
    await client.aclose()


async def test_many_posts_of_one_feed_in_one_call_keep_their_order(
    redis: aioredis.Redis, settings: Settings, live: Any
) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    await live.subscribe("user:ann", "event:race")
    ids = [await ingest(redis, "ann", f"p{i}", ["race"] if i % 2 else []) for i in range(40)]
    entries = await read_all(redis)
    assert await worker.write_feeds(entries) == [e[0] for e in entries]
    assert await history(redis, "user:ann") == [("post", i) for i in ids]
    assert await history(redis, "event:race") == [("post", i) for i in ids[1::2]]
    got = await live.take(40 + 20)
    for feed, expected in (("user:ann", ids), ("event:race", ids[1::2])):
        frames = [(entry_id, frame) for f, entry_id, frame in got if f == feed]
        assert [frame["post"]["id"] for _, frame in frames] == expected
        epoch = (await redis.hget(keys.feed_meta(feed), "epoch")).decode()
        assert [frame["cursor"] for _, frame in frames] == [f"{epoch}.{entry_id}" for entry_id, _ in frames]
        assert all(frame["op"] == "post" and frame["feed"] == feed for _, frame in frames)
    index = await redis.hgetall(keys.feed_index("user:ann"))
    assert sorted(index) == sorted(i.encode() for i in ids)


async def test_a_redelivered_batch_writes_and_publishes_nothing_twice(
    redis: aioredis.Redis, settings: Settings, live: Any
) -> None:
    await live.subscribe("user:bo", "user:cy")
    doomed = FanoutWorker(redis, settings, consumer="doomed")
    await doomed.ensure_group()
    ids = [await ingest(redis, "bo" if i % 3 else "cy", f"p{i}") for i in range(12)]
    entries = await read_all(redis, "doomed")
    await doomed.write_feeds(entries[:7])  # then it dies: nothing acknowledged
    first = await live.take(7)

    rescuer = FanoutWorker(redis, settings.replace(claim_idle_ms=0), consumer="rescuer")
    assert await rescuer.claim_stale() == 12
    rest = await live.take(5)
    assert await live.nothing_more()
    for feed, wanted in (("user:bo", [i for n, i in enumerate(ids) if n % 3]), ("user:cy", ids[::3])):
        assert [frame["post"]["id"] for f, _, frame in first + rest if f == feed] == wanted
    assert await history(redis, "user:bo") == [("post", i) for n, i in enumerate(ids) if n % 3]
    assert await history(redis, "user:cy") == [("post", i) for n, i in enumerate(ids) if not n % 3]
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0


async def test_trimming_a_batch_is_exact_and_marks_the_newest_trimmed_item(
    redis: aioredis.Redis, settings: Settings, live: Any
) -> None:
    worker = FanoutWorker(redis, settings.replace(feed_history_len=10))
    await worker.ensure_group()
    await live.subscribe("user:di")
    ids = [await ingest(redis, "di", f"p{i}") for i in range(35)]
    await worker.write_feeds(await read_all(redis))
    item_ids = [entry_id for _, entry_id, _ in await live.take(35)]
    assert await history(redis, "user:di") == [("post", i) for i in ids[-10:]]
    trimmed = await redis.hget(keys.feed_meta("user:di"), "trimmed")
    assert trimmed.decode() == item_ids[-11]
    assert sorted(await redis.hkeys(keys.feed_index("user:di"))) == sorted(i.encode() for i in ids[-10:])
    # A re-delivered post still in the history is skipped.
    await worker.write_feeds([(ids[-1].encode(), {b"a": b"di", b"d": orjson.dumps({"text": "x", "events": [], "media": []})})])
    assert len(await history(redis, "user:di")) == 10


async def test_posts_and_deletes_in_one_batch_apply_in_order(
    redis: aioredis.Redis, settings: Settings, live: Any
) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    await live.subscribe("user:ed", "event:cup")
    a = await ingest(redis, "ed", "a", ["cup"])
    b = await ingest(redis, "ed", "b")
    await delete(redis, a, ["user:ed", "event:cup"])
    c = await ingest(redis, "ed", "c", ["cup"])
    await delete(redis, c, ["user:ed"])
    entries = await read_all(redis)
    assert len(entries) == 5
    assert await worker.write_feeds(entries) == [e[0] for e in entries]
    assert await history(redis, "user:ed") == [("post", b), ("delete", a), ("delete", c)]
    assert await history(redis, "event:cup") == [("delete", a), ("post", c)]
    got = [(feed, frame["op"], frame.get("post_id") or frame["post"]["id"]) for feed, _, frame in await live.take(8)]
    assert [g for g in got if g[0] == "user:ed"] == [
        ("user:ed", "post", a),
        ("user:ed", "post", b),
        ("user:ed", "delete", a),
        ("user:ed", "post", c),
        ("user:ed", "delete", c),
    ]
    assert [g for g in got if g[0] == "event:cup"] == [("event:cup", "post", a), ("event:cup", "delete", a), ("event:cup", "post", c)]


async def test_a_delete_ahead_of_its_post_leaves_the_post_out(redis: aioredis.Redis, settings: Settings) -> None:
    """Re-delivery can bring a post after its delete: the tombstone keeps it out,
    whether the two are in one batch or not."""
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    p = await ingest(redis, "fi", "doomed")
    q = await ingest(redis, "fi", "also doomed")
    await delete(redis, p, ["user:fi"])
    await delete(redis, q, ["user:fi"])
    post_p, post_q, delete_p, delete_q = await read_all(redis)
    await worker.write_feeds([delete_p])
    await worker.write_feeds([post_p])
    await worker.write_feeds([delete_q, post_q])
    assert await history(redis, "user:fi") == [("delete", p), ("delete", q)]
    assert await redis.hgetall(keys.feed_index("user:fi")) == {p.encode(): b"x", q.encode(): b"x"}


async def test_a_deleted_feed_takes_no_posts_from_a_batch(redis: aioredis.Redis, settings: Settings) -> None:
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    await redis.hset(keys.feed_meta("event:gone"), "deleted", "1")
    kept = await ingest(redis, "gus", "one", ["gone"])
    await worker.write_feeds(await read_all(redis))
    assert await history(redis, "event:gone") == []
    assert await history(redis, "user:gus") == [("post", kept)]


async def test_the_run_loop_fans_out_acks_and_stops_cleanly(
    redis: aioredis.Redis, settings: Settings, live: Any
) -> None:
    """Over the worker's own auto-pipelined connection: batches, acks sent with
    the next read, a lost script cache reloaded, every ack flushed at the stop."""
    worker = FanoutWorker(redis, settings, consumer="looper")
    await live.subscribe("user:hu")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    ids = [await ingest(redis, "hu", f"p{i}") for i in range(30)]
    assert [frame["post"]["id"] for _, _, frame in await live.take(30)] == ids
    await redis.script_flush()  # as after a restart: the next batch gets NOSCRIPT
    more = [await ingest(redis, "hu", f"q{i}") for i in range(5)]
    assert [frame["post"]["id"] for _, _, frame in await live.take(5)] == more
    stop.set()
    await asyncio.wait_for(task, 10)
    assert await history(redis, "user:hu") == [("post", i) for i in ids + more]
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0
    assert await redis.xinfo_consumers(keys.ingest_stream(), keys.FANOUT_GROUP) == []
    assert worker.processed == 35


# -- the plan, pure ------------------------------------------------------------------


class FakeScript:
    def __init__(self, sha: str) -> None:
        self.sha = sha


class FakeScripts:
    feed_append = FakeScript("append")
    feed_delete = FakeScript("delete")


def cluster_slot(feed: str) -> int:
    return key_slot(keys.feed_stream(feed).encode())


def make_plan(slot_of: Any = cluster_slot) -> Plan:
    scripts: Any = FakeScripts()  # only the shas are read
    return Plan(scripts, 100, "e1", slot_of)


def test_plan_groups_posts_by_slot_with_every_key_of_a_call_in_one_slot() -> None:
    plan = make_plan()
    plan.post(0, "1-0", b"{}", ["user:a", "event:x"])
    plan.post(1, "2-0", b"{}", ["user:b", "event:x"])
    plan.post(2, "3-0", b"{}", ["user:a"])
    calls = plan.finish()
    by_feed: dict[str, list[int]] = {}
    for call in calls:
        assert call.sha == "append"
        assert len({key_slot(k.encode()) for k in call.keys}) == 1
        args = call.args
        assert args[:2] == [100, "e1"]
        posts = args[3 : 3 + 2 * args[2]]
        at = 3 + 2 * args[2]
        for f in range(len(call.keys) // 3):
            feed, n = args[at + 1], args[at + 2]
            assert args[at] == keys.feed_channel(feed) and call.keys[3 * f] == keys.feed_stream(feed)
            numbers = args[at + 3 : at + 3 + n]
            by_feed.setdefault(feed, []).extend(int(posts[2 * (k - 1)].partition("-")[0]) - 1 for k in numbers)
            at += 3 + n
        assert at == len(args)
    assert sum(len(c.owners) for c in calls) == 5
    assert by_feed == {"user:a": [0, 2], "event:x": [0, 1], "user:b": [1]}


def test_plan_on_a_single_server_is_one_call_per_batch() -> None:
    plan = make_plan(lambda feed: 0)
    for n in range(50):
        plan.post(n, f"{n + 1}-0", b"{}", [f"user:u{n % 7}", "event:all"])
    (call,) = plan.finish()
    assert call.args[2] == 50  # each post once, whatever the number of its feeds
    assert sorted(call.owners) == sorted(list(range(50)) * 2)


def test_plan_splits_calls_at_the_item_bound_keeping_order() -> None:
    plan = make_plan(lambda feed: 0)
    total = MAX_CALL_ITEMS * 2 + 5
    for n in range(total):
        plan.post(n, f"{n + 1}-0", b"{}", ["user:one"])
    calls = plan.finish()
    assert len(calls) == 3
    assert [o for c in calls for o in c.owners] == list(range(total))
    assert all(len(c.owners) <= MAX_CALL_ITEMS for c in calls)


def test_plan_puts_a_delete_between_the_posts_around_it() -> None:
    plan = make_plan()
    plan.post(0, "1-0", b"{}", ["user:a", "event:x"])
    plan.delete(1, "1-0", ["user:a", "event:x"])
    plan.post(2, "3-0", b"{}", ["user:a"])
    calls = plan.finish()
    kinds = [(c.sha, c.owners) for c in calls]
    deletes = [n for n, (sha, _) in enumerate(kinds) if sha == "delete"]
    assert len(deletes) == 2
    assert all(0 in kinds[n][1] for n in range(deletes[0]) if kinds[n][0] == "append")
    assert kinds[-1] == ("append", [2])
    assert calls[deletes[0]].args == [keys.feed_channel("user:a"), "user:a", "1-0", "e1"]

