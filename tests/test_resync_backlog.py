"""A feed's refill after the live connection to Redis breaks: a backlog far
larger than a socket's bound reaches a reader that keeps reading, paced page
by page, instead of closing it 4008 (real Redis, the real app, a real socket)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from streamd import keys
from streamd.settings import Settings

FEED = "event:derby"
BACKLOG = 30_000  # ~20 MB of frames: more than the kernel's socket buffers take
BOUND = 64 * 1024


async def test_a_refill_larger_than_the_socket_bound_is_paced_not_closed(
    start_server: Any, settings: Settings, redis: aioredis.Redis
) -> None:
    server = await start_server(settings.replace(socket_buffer_bytes=BOUND, replay_page=100), with_worker=False)
    async with aiohttp.ClientSession() as session, session.ws_connect(server.make_url("/v1/ws")) as ws:
        await ws.send_str(orjson.dumps({"op": "subscribe", "ref": 1, "feed": FEED}).decode())
        assert orjson.loads((await ws.receive()).data)["op"] == "subscribed"

        # History the live channel never carried (no publish), as when the
        # worker wrote while the gateway's pub/sub connection was down.
        text = "x" * 500
        ids = []
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(BACKLOG):
                post = orjson.dumps({"id": f"{n + 1}-0", "author": "bookie", "text": text, "events": ["derby"]})
                pipe.xadd(keys.feed_stream(FEED), {"t": "post", "pid": f"{n + 1}-0", "p": post})
            ids = [i.decode() for i in await pipe.execute()]
        await redis.client_kill_filter(_type="pubsub")  # the gateway reconnects and refills the feed

        got: list[str] = []
        while len(got) < BACKLOG:
            msg = await asyncio.wait_for(ws.receive(), 30)
            assert msg.type == aiohttp.WSMsgType.TEXT, f"closed {ws.close_code} after {len(got)} of {BACKLOG} items"
            frame = orjson.loads(msg.data)
            if frame["op"] == "post":
                got.append(frame["cursor"].rsplit(".", 1)[1])
            if len(got) % 100 == 0:
                # A steady reader, slower than Redis hands out pages: about
                # 20,000 frames a second.
                await asyncio.sleep(0.005)
        assert got == ids
