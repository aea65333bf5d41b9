"""On a single server the script that accepts a post also fans it out (ingest_fanout.lua)."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from streamd import keys
from streamd.fanout import FanoutWorker
from streamd.posts import build_post
from streamd.settings import Settings
from tests.helpers import Api, WsClient
from tests.test_lists_e2e import make_list


async def _api(start_server: Any, settings: Settings, session: Any) -> tuple[TestServer, Api]:
    server = await start_server(settings, with_worker=False)
    return server, Api(session, str(server.make_url("")).rstrip("/"))


async def _feed_post_ids(redis: aioredis.Redis, feed: str) -> list[str]:
    return [fields[b"pid"].decode() for _, fields in await redis.xrange(keys.feed_stream(feed))]


async def test_a_post_reaches_every_feed_with_no_worker_and_the_worker_only_acknowledges_it(
    start_server: Any, settings: Settings, session: Any, redis: aioredis.Redis
) -> None:
    server, api = await _api(start_server, settings, session)
    fan, jane = await api.user("fan"), await api.user("jane")
    lst = await make_list(api, fan)
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    ws = WsClient(await session.ws_connect(server.make_url("/v1/ws")))
    feeds = ["user:jane", f"list:{lst['id']}", "event:derby-2026"]
    for feed in feeds:
        await ws.subscribe(feed)
    post = await api.post(jane, "Gate 4 \u2014 \"fast\"\n", events=["derby-2026"])
    got = {}
    for _ in feeds:
        frame = await ws.recv()
        assert frame["post"] == post
        got[frame["feed"]] = frame["cursor"]
    assert sorted(got) == sorted(feeds)

    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    assert await worker.step() == 1
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0
    for feed in feeds:  # once: the worker wrote nothing again
        assert await _feed_post_ids(redis, feed) == [post["id"]]
    await ws.ws.close()


async def test_the_item_is_the_bytes_the_worker_would_write(
    start_server: Any, settings: Settings, session: Any, redis: aioredis.Redis
) -> None:
    _, api = await _api(start_server, settings, session)
    media = [{"type": "image", "url": "https://example.com/a.png?x=1&y=\u00e9"}]
    for n, author in enumerate(("ann", "bob")):
        token = await api.user(author)
        post = await api.post(token, f"\u00bd length \\ {n} \t\"q\"", events=["oaks", "derby-2026"], media=media)
        (_, fields), = await redis.xrange(keys.feed_stream(f"user:{author}"))
        body = orjson.dumps({"text": post["text"], "events": post["events"], "media": post["media"]})
        assert fields[b"p"] == orjson.dumps(build_post(post["id"], author, body))


async def test_a_feed_redis_refuses_sends_the_post_to_the_dead_letters_and_the_rest_is_written(
    start_server: Any, settings: Settings, session: Any, redis: aioredis.Redis
) -> None:
    _, api = await _api(start_server, settings, session)
    token = await api.user("hal")
    await redis.set(keys.feed_stream("event:broken"), "not a stream")
    post = await api.post(token, "tagged with a broken feed", events=["broken"])
    assert await _feed_post_ids(redis, "user:hal") == [post["id"]]
    dead = await redis.xrange(keys.dead_letter_stream())
    assert len(dead) == 1 and b"refused" in dead[0][1][b"reason"]
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    assert await worker.step() == 1
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0
    assert await _feed_post_ids(redis, "user:hal") == [post["id"]]
