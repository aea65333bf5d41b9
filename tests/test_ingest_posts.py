"""Accepting posts on the auto-pipelined path: what it must keep of the slow one.

Two apps sharing one Redis stand for two gateway processes.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from streamd import keys
from streamd.embedded import EmbeddedRedis
from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, Api


async def _two_apps(start_server: Any, settings: Settings, session: aiohttp.ClientSession) -> tuple[Api, Api]:
    first = await start_server(settings, with_worker=False)
    second = await start_server(settings, with_worker=False)
    return Api(session, str(first.make_url("")).rstrip("/")), Api(session, str(second.make_url("")).rstrip("/"))


async def test_a_revoked_token_is_refused_at_once_by_another_gateway(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession
) -> None:
    one, two = await _two_apps(start_server, settings, session)
    status, body = await one.call("POST", "/v1/users", {"handle": "rider"}, ADMIN_TOKEN)
    assert status == 201
    token, token_id = body["token"], body["token_id"]
    for _ in range(3):  # the second gateway knows the token well by now
        await two.post(token, "before")
    assert (await one.call("DELETE", f"/v1/users/rider/tokens/{token_id}", None, ADMIN_TOKEN))[0] == 204
    status, body = await two.call("POST", "/v1/posts", {"text": "after"}, token)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    # Other routes of the second gateway refuse it too.
    assert (await two.call("GET", "/v1/users/rider", None, token))[0] == 401


async def test_the_rate_limit_counts_posts_on_every_gateway(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession
) -> None:
    one, two = await _two_apps(start_server, settings.replace(posts_per_minute=4), session)
    for attempt in range(2):  # a minute boundary between the posts starts a new budget: once more then
        token = await one.user(f"chatty{attempt}")
        window = int(time.time() // 60)
        statuses = []
        for i in range(6):
            status, body = await (one if i % 2 else two).call("POST", "/v1/posts", {"text": f"n{i}"}, token)
            statuses.append(status)
            if status == 429:
                assert body["error"]["code"] == "rate_limited"
        if int(time.time() // 60) == window:
            break
    assert statuses == [201, 201, 201, 201, 429, 429]


async def test_concurrent_posts_are_each_accepted_once_in_order_per_author(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    one, two = await _two_apps(start_server, settings, session)
    authors = [f"a{i}" for i in range(8)]
    tokens = {a: await one.user(a) for a in authors}
    per_author = 25

    async def lane(author: str, api: Api) -> list[str]:
        # One author's posts one after the other; all authors at once.
        return [(await api.post(tokens[author], f"{author} {n}"))["id"] for n in range(per_author)]

    async def burst(author: str, api: Api) -> list[str]:
        # And the same author's posts all at once, on both gateways.
        posts = await asyncio.gather(*(api.post(tokens[author], f"{author} burst {n}") for n in range(per_author)))
        return [p["id"] for p in posts]

    lanes = await asyncio.gather(
        *(lane(a, one if i % 2 else two) for i, a in enumerate(authors)),
        *(burst(a, two if i % 2 else one) for i, a in enumerate(authors)),
    )
    accepted = [post_id for ids in lanes for post_id in ids]
    assert len(accepted) == len(set(accepted)) == 2 * len(authors) * per_author

    entries = await redis.xrange(keys.ingest_stream(0))
    assert sorted(e[0].decode() for e in entries) == sorted(accepted)  # each once, nothing else
    texts: dict[str, list[str]] = defaultdict(list)
    for _, fields in entries:
        body = orjson.loads(fields[b"d"])
        if " burst " not in body["text"]:
            texts[fields[b"a"].decode()].append(body["text"])
    assert texts == {a: [f"{a} {n}" for n in range(per_author)] for a in authors}


async def test_a_post_reaches_the_lists_its_author_is_in_when_accepted(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession, redis: aioredis.Redis
) -> None:
    one, two = await _two_apps(start_server, settings, session)
    curator = await one.user("curator")
    writer = await one.user("writer")
    status, body = await one.call("POST", "/v1/lists", {"name": "picks", "visibility": "public"}, curator)
    assert status == 201
    list_id = body["list"]["id"]

    async def feeds_of(post: dict[str, Any]) -> list[str]:
        raw = await redis.hget(keys.post_record(0, post["id"]), "f")
        return list(orjson.loads(raw))

    assert await feeds_of(await two.post(writer, "alone")) == ["user:writer"]
    assert (await one.call("PUT", f"/v1/lists/{list_id}/members/writer", None, curator))[0] == 204
    assert await feeds_of(await two.post(writer, "listed")) == ["user:writer", f"list:{list_id}"]
    assert (await one.call("DELETE", f"/v1/lists/{list_id}/members/writer", None, curator))[0] == 204
    assert await feeds_of(await two.post(writer, "unlisted", events=["derby"])) == ["user:writer", "event:derby"]


async def test_idempotent_repeats_answer_the_first_post(api: Api) -> None:
    token = await api.user("careful")
    first = await api.call("POST", "/v1/posts", {"text": "once", "idempotency_key": "k1"}, token)
    again = await api.call("POST", "/v1/posts", {"text": "twice?", "idempotency_key": "k1"}, token)
    assert first[0] == again[0] == 201
    assert again[1]["post"] == first[1]["post"] and first[1]["post"]["text"] == "once"


async def test_errors_keep_their_order_token_first(api: Api) -> None:
    token = await api.user("sloppy")
    assert (await api.call("POST", "/v1/posts", raw=b"{not json", token="sdu_nope"))[0] == 401
    assert (await api.call("POST", "/v1/posts", raw=b"{not json", token=ADMIN_TOKEN))[0] == 403
    status, body = await api.call("POST", "/v1/posts", raw=b"{not json", token=token)
    assert status == 400 and body["error"]["message"] == "request body is not valid JSON"
    status, body = await api.call("POST", "/v1/posts", {"text": "x", "extra": 1}, token)
    assert status == 400 and "extra" in body["error"]["message"]
    assert (await api.call("POST", "/v1/posts", {"text": "fine"}, token))[0] == 201


async def test_a_redis_outage_is_503_and_posting_resumes_after(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    private = EmbeddedRedis(tmp_path / "redis", appendonly=True)
    private.start()
    try:
        srv = await start_server(settings, with_worker=False, url=private.url)
        api = Api(session, str(srv.make_url("")).rstrip("/"))
        token = await api.user("steady")
        await api.post(token, "before")
        private.stop()
        status, body = await api.call("POST", "/v1/posts", {"text": "during"}, token)
        assert status == 503 and body["error"]["code"] == "unavailable"
        private.start()
        await api.post(token, "after")  # the token survived in the AOF
    finally:
        private.stop()


async def test_wait_replicas_accepts_once_a_replica_has_the_post(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    primary = EmbeddedRedis(tmp_path / "primary", appendonly=False, extra_args=("--repl-diskless-sync-delay", "0"))
    primary.start()
    replica = EmbeddedRedis(tmp_path / "replica", appendonly=False, extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
    try:
        srv = await start_server(settings.replace(wait_replicas=1, wait_timeout_ms=500), with_worker=False, url=primary.url)
        api = Api(session, str(srv.make_url("")).rstrip("/"))
        token = await api.user("durable")
        # No replica yet: WAIT sees none, the post is not confirmed (503) though written.
        status, body = await api.call("POST", "/v1/posts", {"text": "unconfirmed", "idempotency_key": "k"}, token)
        assert status == 503 and body["error"]["code"] == "unavailable"
        replica.start()
        client = aioredis.Redis.from_url(replica.url)
        on_primary = aioredis.Redis.from_url(primary.url)
        try:
            # Until a write of our own is confirmed: the replica has synced and acks.
            await on_primary.set("sd:test:synced", "1")
            for _ in range(200):  # 20 s at most
                if await on_primary.execute_command("WAIT", 1, 100) >= 1:
                    break
            else:
                pytest.fail("the replica never acknowledged a write")
            # The retry with the same key answers the post kept by the first try.
            status, body = await api.call("POST", "/v1/posts", {"text": "unconfirmed", "idempotency_key": "k"}, token)
            assert status == 201 and body["post"]["text"] == "unconfirmed"
            post = await api.post(token, "confirmed")
            assert await client.hget(keys.post_record(0, post["id"]), "a") == b"durable"  # on the replica
        finally:
            await client.aclose()
            await on_primary.aclose()
    finally:
        replica.stop()
        primary.stop()
