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


async def test_a_delete_reaches_every_feed_with_no_worker_and_the_worker_only_acknowledges_it(
    start_server: Any, settings: Settings, session: Any, redis: aioredis.Redis
) -> None:
    server, api = await _api(start_server, settings, session)
    jane = await api.user("jane")
    feeds = ["user:jane", "event:derby-2026"]
    post = await api.post(jane, "withdrawn", events=["derby-2026"])
    ws = WsClient(await session.ws_connect(server.make_url("/v1/ws")))
    for feed in feeds:
        await ws.subscribe(feed)
    status, _ = await api.call("DELETE", f"/v1/posts/{post['id']}", None, jane)
    assert status == 204
    got = {}
    for _ in feeds:
        frame = await ws.recv()
        assert frame["op"] == "delete" and frame["post_id"] == post["id"], frame
        got[frame["feed"]] = frame["cursor"]
    assert sorted(got) == sorted(feeds)
    for feed in feeds:  # the post is out of the histories, its tombstone in
        assert await _feed_post_ids(redis, feed) == [post["id"]]
        (_, fields), = await redis.xrange(keys.feed_stream(feed))
        assert fields[b"t"] == b"delete"

    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    assert await worker.step() == 2  # the post and its delete: acknowledged, nothing written again
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0
    for feed in feeds:
        assert len(await redis.xrange(keys.feed_stream(feed))) == 1
    sample = worker.metrics.registry.get_sample_value
    assert sample("streamd_posts_fanned_out_total") == 1  # the delete is no post
    assert sample("streamd_feed_items_written_total") == 4  # two posts and two deletes
    assert sample("streamd_ingest_lag_seconds_count") == 2  # of the posts' items only
    status, _ = await api.call("DELETE", f"/v1/posts/{post['id']}", None, jane)
    assert status == 404
    await ws.ws.close()


async def test_a_delete_redis_refuses_on_a_feed_is_finished_by_the_worker(
    start_server: Any, settings: Settings, session: Any, redis: aioredis.Redis
) -> None:
    _, api = await _api(start_server, settings, session)
    token = await api.user("hal")
    post = await api.post(token, "soon broken", events=["broken"])
    await redis.delete(keys.feed_index("event:broken"))
    await redis.set(keys.feed_index("event:broken"), "not a hash")
    status, _ = await api.call("DELETE", f"/v1/posts/{post['id']}", None, token)
    assert status == 204
    # The other feed has the delete already; the entry waits for the worker.
    (_, fields), = await redis.xrange(keys.feed_stream("user:hal"), "-", "+")
    assert fields[b"t"] == b"delete"
    worker = FanoutWorker(redis, settings)
    await worker.ensure_group()
    assert await worker.step() == 2
    assert (await redis.xpending(keys.ingest_stream(), keys.FANOUT_GROUP))["pending"] == 0
    assert len(await redis.xrange(keys.feed_stream("user:hal"))) == 1  # not sent twice
    dead = await redis.xrange(keys.dead_letter_stream())
    assert len(dead) == 1 and b"refused" in dead[0][1][b"reason"]
