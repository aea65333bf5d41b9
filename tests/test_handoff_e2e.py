"""Replay-to-live handoff while posts are flowing, and live subscriptions shared per process."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from streamd import keys
from tests.helpers import Api


async def test_resume_during_a_burst_has_no_gap_and_no_duplicate(api: Api, ws_connect: Any) -> None:
    token = await api.user("burst")
    reference = await ws_connect()
    await reference.subscribe("user:burst")
    total = 150

    async def post_all() -> list[str]:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with sem:
                return (await api.post(token, f"p{i}"))["id"]

        return list(await asyncio.gather(*(one(i) for i in range(total))))

    poster = asyncio.create_task(post_all())
    seen = []  # (post id, cursor) in the order the reference socket got them
    resumed: list[tuple[int, Any]] = []
    fresh: list[Any] = []
    while len(seen) < total:
        frame = await reference.recv()
        seen.append((frame["post"]["id"], frame["cursor"]))
        if len(seen) in (10, 60, 110):
            ws = await ws_connect()
            await ws.subscribe("user:burst", cursor=frame["cursor"])
            resumed.append((len(seen), ws))
            ws2 = await ws_connect()
            await ws2.subscribe("user:burst")
            fresh.append(ws2)
    posted = await poster
    assert sorted(pid for pid, _ in seen) == sorted(posted)
    order = [pid for pid, _ in seen]

    for k, ws in resumed:
        got = [f["post"]["id"] for f in await ws.items(total - k)]
        assert got == order[k:], f"resume after item {k} is not exact"
    marker = await api.post(token, "marker")
    for _, ws in resumed:
        assert (await ws.recv())["post"]["id"] == marker["id"]
    for ws in fresh:
        got = []
        while not got or got[-1] != marker["id"]:
            got.append((await ws.recv())["post"]["id"])
        # Whatever it starts with, it is a contiguous, duplicate-free suffix.
        assert got[:-1] == order[len(order) - len(got) + 1 :]


async def test_one_redis_subscription_per_feed_per_process(api: Api, ws_connect: Any, redis: aioredis.Redis) -> None:
    channel = keys.feed_channel("event:shared")

    async def numsub() -> int:
        return int((await redis.pubsub_numsub(channel))[0][1])

    clients = [await ws_connect() for _ in range(4)]
    for ws in clients:
        await ws.subscribe("event:shared")
    assert await numsub() == 1
    for ws in clients[:3]:
        await ws.request("unsubscribe", feed="event:shared")
    assert await numsub() == 1
    await clients[3].ws.close()
    # The last local subscriber is gone: the process drops its subscription.
    for _ in range(200):
        if await numsub() == 0:
            break
        await asyncio.sleep(0.01)
    assert await numsub() == 0


async def test_a_burst_of_subscribes_larger_than_the_redis_pool(
    start_server: Any, settings: Any, session: Any
) -> None:
    """Hundreds of sockets subscribing at once (a reconnect storm) wait for a
    pooled Redis connection instead of failing."""
    srv = await start_server(settings.replace(redis_pool_size=4))
    url = srv.make_url("/v1/ws")
    sockets = await asyncio.gather(*(session.ws_connect(url) for _ in range(150)))

    async def subscribe(i: int, ws: Any) -> dict[str, Any]:
        await ws.send_json({"op": "subscribe", "feed": f"event:storm-{i % 20}", "backlog": 5})
        reply: dict[str, Any] = await ws.receive_json(timeout=20)
        return reply

    replies = await asyncio.gather(*(subscribe(i, ws) for i, ws in enumerate(sockets)))
    assert [r["op"] for r in replies] == ["subscribed"] * 150
    await asyncio.gather(*(ws.close() for ws in sockets))
