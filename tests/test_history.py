"""Reading feed histories: the auto-pipelined reader gives what redis-py's does (real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from streamd import cursors, keys, store
from streamd.autopipe import AutoPipeline
from streamd.history import Histories

FEED = "event:ascot-r3"


@pytest.fixture
async def readers(redis: aioredis.Redis) -> AsyncIterator[tuple[Histories, Histories]]:
    fast = AutoPipeline.for_client(redis)
    assert fast is not None
    try:
        yield Histories(redis), Histories(redis, store.Scripts.register(redis), fast)
    finally:
        await fast.aclose()


async def test_both_readers_give_the_same_snapshots_and_pages(
    redis: aioredis.Redis, readers: tuple[Histories, Histories]
) -> None:
    plain, fast = readers
    # A feed that does not exist yet: no epoch, nothing trimmed, no entries.
    for reader in readers:
        snap = await reader.snapshot(FEED, 5)
        assert (snap.epoch, snap.trimmed, snap.newest, snap.head) == (None, cursors.ZERO, [], cursors.ZERO)

    ids = [await redis.xadd(keys.feed_stream(FEED), {"t": "post", "pid": f"{n}-0", "p": f'{{"n":{n}}}'}) for n in range(7)]
    ids.append(await redis.xadd(keys.feed_stream(FEED), {"t": "delete", "pid": "3-0"}))
    await redis.hset(keys.feed_meta(FEED), mapping={"epoch": "00c0ffee", "trimmed": "5-1"})

    for newest in (1, 3, 20):
        want, got = await plain.snapshot(FEED, newest), await fast.snapshot(FEED, newest)
        assert got == want
        assert [e[0] for e in got.newest] == list(reversed(ids))[:newest]
    snap = await fast.snapshot(FEED, 1)
    assert (snap.epoch, snap.trimmed, snap.head) == ("00c0ffee", (5, 1), cursors.parse_entry_id(ids[-1]))
    assert snap.newest[0][1] == {b"t": b"delete", b"pid": b"3-0"}

    after = cursors.parse_entry_id(ids[2])
    for count in (1, 4, 100):
        want_page, got_page = await plain.read_after(FEED, after, count), await fast.read_after(FEED, after, count)
        assert got_page == want_page
        assert [e[0] for e in got_page] == ids[3 : 3 + count]
    assert await fast.read_after(FEED, cursors.parse_entry_id(ids[-1]), 10) == []
