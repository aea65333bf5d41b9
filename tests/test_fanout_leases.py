"""Fan-out processes share the ingest shards: a process started later gets its
share, one that stops hands its shards over, and posts stay exact and in
order per feed through every hand-over (real Redis, workers in this process
standing for two processes, one LeaseBook each)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis

from streamd import keys
from streamd.fanout import FanoutWorker, LeaseBook
from streamd.posts import post_id_for
from streamd.settings import Settings

SHARDS = 4


class Process:
    """The workers of one fan-out process: one per shard, one book."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, name: str) -> None:
        self.book = LeaseBook(redis, SHARDS, settings.claim_idle_ms, name)
        self.stop = asyncio.Event()
        self.tasks = [
            asyncio.create_task(FanoutWorker(redis, settings, shard=s, book=self.book).run(self.stop))
            for s in range(SHARDS)
        ]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


async def until(check: Callable[[], bool], what: Callable[[], str], timeout: float = 15.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)  # polls state the workers hold; they signal nothing
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what()}") from None


async def history_ids(redis: aioredis.Redis, feed: str) -> list[str]:
    return [fields[b"pid"].decode() for _, fields in await redis.xrange(keys.feed_stream(feed))]


async def two_processes(redis: aioredis.Redis, settings: Settings) -> tuple[Process, Process]:
    """A first process that takes every shard, then a second that gets its share."""
    first = Process(redis, settings, "first")
    await until(lambda: first.book.held == set(range(SHARDS)), lambda: f"the only process holds every shard ({first.book.held})")
    second = Process(redis, settings, "second")
    await until(
        lambda: len(first.book.held) == 2 and len(second.book.held) == 2,
        lambda: f"two shards each (first {first.book.held}, second {second.book.held})",
    )
    return first, second


async def test_shards_spread_over_processes_and_move_back_when_one_stops(
    redis: aioredis.Redis, settings: Settings
) -> None:
    settings = settings.replace(ingest_shards=SHARDS, claim_idle_ms=300)
    accepted: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    posting = asyncio.Event()

    async def post_forever() -> None:
        n = 0
        while not posting.is_set():
            for shard in range(SHARDS):
                body = orjson.dumps({"text": f"p{n}", "events": [], "media": []})
                entry: bytes = await redis.xadd(keys.ingest_stream(shard), {"a": f"author{shard}", "d": body, "l": b"[]"})
                accepted[shard].append(post_id_for(entry.decode(), shard, SHARDS))
            n += 1
            await asyncio.sleep(0.005)  # a steady trickle of posts while the leases move

    poster = asyncio.create_task(post_forever())
    first, second = await two_processes(redis, settings)
    assert not first.book.held & second.book.held

    await second.close()
    await until(lambda: first.book.held == set(range(SHARDS)), lambda: f"the stopped process's shards come back ({first.book.held})")
    assert await redis.zrange(keys.FANOUT_PROCESSES, 0, -1) == [b"first"]

    posting.set()
    await poster
    for shard in range(SHARDS):
        feed = f"user:author{shard}"
        await until_history(redis, feed, len(accepted[shard]))
        assert await history_ids(redis, feed) == accepted[shard], f"shard {shard}: every post once, in order"
    await first.close()
    assert await redis.zcard(keys.FANOUT_PROCESSES) == 0


async def until_history(redis: aioredis.Redis, feed: str, n: int) -> None:
    async with asyncio.timeout(15):
        while await redis.xlen(keys.feed_stream(feed)) < n:
            await asyncio.sleep(0.02)  # the worker writes on its own schedule


async def test_a_shard_whose_worker_hangs_is_taken_over_beyond_the_share(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """A worker that stops renewing without giving its lease back (a hang, a
    cancelled task): its shard is read again by the other process, even though
    that process already holds its share, and the balance is then restored."""
    settings = settings.replace(ingest_shards=SHARDS, claim_idle_ms=300)
    first, second = await two_processes(redis, settings)
    victim = min(first.book.held)
    first.tasks[victim].cancel()  # stops without releasing: the lease and the book entry just expire
    await until(
        lambda: victim in second.book.held and len(first.book.held) == 2 and len(second.book.held) == 2,
        lambda: f"shard {victim} read again, two each (first {first.book.held}, second {second.book.held})",
    )
    body = orjson.dumps({"text": "after the hang", "events": [], "media": []})
    entry: bytes = await redis.xadd(keys.ingest_stream(victim), {"a": "late", "d": body, "l": b"[]"})
    await until_history(redis, "user:late", 1)
    assert await history_ids(redis, "user:late") == [post_id_for(entry.decode(), victim, SHARDS)]
    first.tasks.pop(victim)
    await second.close()
    await first.close()
