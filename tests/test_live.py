"""LiveChannels on its own: the process's pub/sub connection to a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamd.live import LiveChannels


class Heard:
    """What a LiveChannels passed on: messages, with the task each came in (if any)."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.tasks: list[asyncio.Task[object] | None] = []
        self.resynced: list[frozenset[bytes]] = []
        self.changed = asyncio.Event()

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))
        self.tasks.append(asyncio.current_task())
        self.changed.set()

    def on_resync(self, channels: frozenset[bytes]) -> None:
        self.resynced.append(channels)
        self.changed.set()

    async def until(self, done: object, seconds: float = 10.0) -> None:
        async def wait() -> None:
            while not callable(done) or not done():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), seconds)


@pytest.fixture
async def heard() -> Heard:
    return Heard()


@pytest.fixture
async def live(redis_url: str, heard: Heard) -> AsyncIterator[LiveChannels]:
    client = aioredis.Redis.from_url(redis_url)
    async with LiveChannels(client, heard.on_message, heard.on_resync) as channels:
        yield channels
    await client.aclose()


async def test_a_burst_is_passed_on_in_order_as_it_is_read(live: LiveChannels, heard: Heard, redis: aioredis.Redis) -> None:
    await live.subscribe(b"c:one")
    await live.subscribe(b"c:two")
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(200):
            pipe.publish(b"c:one" if i % 2 else b"c:two", b"%d" % i)
        await pipe.execute()
    await heard.until(lambda: len(heard.messages) == 200)
    assert heard.messages == [(b"c:one" if i % 2 else b"c:two", b"%d" % i) for i in range(200)]
    # Handled in the callback that read the bytes: no task woke per message.
    assert set(heard.tasks) == {None}


async def test_a_refused_subscribe_fails_alone(redis_url: str, redis: aioredis.Redis, heard: Heard) -> None:
    # A user that may only use channels under `ok:`: Redis refuses the other with NOPERM.
    await redis.execute_command("ACL", "SETUSER", "live-test", "reset", "on", "nopass", "~*", "&ok:*", "+@all")
    try:
        host_port = redis_url.split("//", 1)[1]
        client = aioredis.Redis.from_url(f"redis://live-test@{host_port}")
        async with LiveChannels(client, heard.on_message, heard.on_resync) as live:
            await live.subscribe(b"ok:a")
            with pytest.raises(ResponseError, match="(?i)permission"):
                await asyncio.wait_for(live.subscribe(b"no:b"), 10)
            # The refusal broke nothing: the connection still carries what it may.
            await live.subscribe(b"ok:c")
            await redis.publish(b"ok:a", b"1")
            await redis.publish(b"ok:c", b"2")
            await heard.until(lambda: len(heard.messages) == 2)
            assert heard.messages == [(b"ok:a", b"1"), (b"ok:c", b"2")]
            assert live.reconnects == 0
        await client.aclose()
    finally:
        await redis.execute_command("ACL", "DELUSER", "live-test")


async def test_a_lost_connection_comes_back_resynced_before_its_messages(
    live: LiveChannels, heard: Heard, redis: aioredis.Redis
) -> None:
    await live.subscribe(b"c:kept")
    await redis.publish(b"c:kept", b"before")
    await heard.until(lambda: len(heard.messages) == 1)
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed == 1
    # Confirmed again on a new connection: the channel is reported for a refill.
    await heard.until(lambda: heard.resynced == [frozenset({b"c:kept"})])
    assert live.reconnects == 1
    await redis.publish(b"c:kept", b"after")
    await heard.until(lambda: len(heard.messages) == 2)
    assert heard.messages == [(b"c:kept", b"before"), (b"c:kept", b"after")]
