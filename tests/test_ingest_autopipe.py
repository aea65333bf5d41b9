"""The auto-pipelined Redis connection (`streamd.autopipe`) against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from streamd.autopipe import AutoPipeline
from streamd.embedded import EmbeddedRedis, free_port


@pytest.fixture
async def pipe(redis: aioredis.Redis) -> AsyncIterator[AutoPipeline]:
    fast = AutoPipeline.for_client(redis)
    assert fast is not None
    yield fast
    await fast.aclose()


async def test_commands_of_one_turn_share_a_write_and_keep_their_order(pipe: AutoPipeline, redis: aioredis.Redis) -> None:
    replies = await asyncio.gather(*(pipe.execute("RPUSH", "sd:test:order", str(i)) for i in range(1000)))
    assert replies == list(range(1, 1001))
    assert [int(v) for v in await redis.lrange("sd:test:order", 0, -1)] == list(range(1000))


async def test_replies_of_every_shape(pipe: AutoPipeline) -> None:
    await pipe.execute("HSET", "sd:test:h", "a", "1")
    assert await pipe.execute("PING") == b"PONG"
    assert await pipe.execute("GET", "sd:test:missing") is None
    assert await pipe.execute("HGETALL", "sd:test:h") == [b"a", b"1"]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await pipe.execute("LPUSH", "sd:test:h", "x")
    # An error reply fails its own command only.
    assert await pipe.execute("HGET", "sd:test:h", "a") == b"1"


async def test_a_script_missing_on_the_server_runs_with_eval(pipe: AutoPipeline, redis: aioredis.Redis) -> None:
    text = "return {KEYS[1], ARGV[1], false}"
    sha = await redis.script_load(text)
    await redis.script_flush()
    with pytest.raises(NoScriptError):
        await pipe.execute("EVALSHA", sha, 1, "k", "v")
    assert await pipe.evalsha(sha, text, ["k"], ["v"]) == [b"k", b"v", None]
    assert await pipe.execute("EVALSHA", sha, 1, "k", "w") == [b"k", b"w", None]  # EVAL cached it


async def test_a_lost_connection_fails_what_was_sent_and_the_next_command_reconnects(
    pipe: AutoPipeline, redis: aioredis.Redis
) -> None:
    client_id = await pipe.execute("CLIENT", "ID")
    blocked = pipe.execute("BLPOP", "sd:test:never", 0)
    await asyncio.sleep(0)  # written
    while not any(c["id"] == str(client_id) and c["cmd"] == "blpop" for c in await redis.client_list()):
        await asyncio.sleep(0.01)
    assert await redis.client_kill_filter(_id=client_id) == 1
    with pytest.raises(RedisConnectionError):
        await blocked
    assert await pipe.execute("PING") == b"PONG"
    assert await pipe.execute("CLIENT", "ID") != client_id


async def test_commands_in_flight_are_bounded(redis: aioredis.Redis) -> None:
    fast = AutoPipeline.for_client(redis, max_pending=2)
    assert fast is not None
    try:
        first, second = fast.execute("PING"), fast.execute("PING")
        with pytest.raises(RedisConnectionError, match="already wait"):
            fast.execute("PING")
        assert list(await asyncio.gather(first, second)) == [b"PONG", b"PONG"]
        assert await fast.execute("PING") == b"PONG"  # room again
    finally:
        await fast.aclose()


async def test_no_server_is_a_connection_error() -> None:
    fast = AutoPipeline(port=free_port())
    try:
        with pytest.raises(RedisConnectionError):
            await fast.execute("PING")
    finally:
        await fast.aclose()


async def test_a_restarted_server_is_used_again_with_password_and_db(tmp_path: object) -> None:
    server = EmbeddedRedis(tmp_path, appendonly=False)  # type: ignore[arg-type]
    server.start()
    try:
        await _require_password(server.url, "s3cret")
        client = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        fast = AutoPipeline.for_client(client)
        assert fast is not None
        try:
            await fast.execute("SET", "sd:test:db", "1")
            assert await client.get("sd:test:db") == b"1"  # db 3, authenticated
            server.stop()
            with pytest.raises(RedisConnectionError):
                await fast.execute("PING")
            server.start()  # the same port
            await _require_password(server.url, "another")
            with pytest.raises(RedisConnectionError):  # AUTH refused: an AuthenticationError
                await fast.execute("PING")
            await _require_password(server.url, "s3cret", current="another")
            await fast.execute("SET", "sd:test:db", "2")
            check = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
            assert await check.get("sd:test:db") == b"2"
            await check.aclose()
        finally:
            await fast.aclose()
            await client.aclose()
    finally:
        server.stop()


async def _require_password(url: str, password: str, current: str | None = None) -> None:
    admin = aioredis.Redis.from_url(url, password=current)
    with contextlib.suppress(RedisConnectionError):  # the server drops the clients of the old password
        await admin.config_set("requirepass", password)
    await admin.aclose()
