"""A feed's refill after the live connection to Redis breaks: a backlog far
larger than a socket's bound reaches a reader that keeps reading, paced page
by page, instead of closing it 4008; the live items that come meanwhile are
held within that bound, and read from the history when they pass it (real
Redis, the real app, real sockets)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from streamd import hub as hub_module
from streamd import keys, store
from streamd.app import METRICS
from streamd.cursors import EntryId, Handoff
from streamd.http_base import HUB
from streamd.settings import Settings

FEED = "event:derby"
BACKLOG = 30_000  # ~20 MB of frames: more than the kernel's socket buffers take
BOUND = 64 * 1024
EPOCH = "e1"


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


class Watched(Handoff):
    """The hub's refill handoff, telling the test when it lets items go."""

    def __init__(self, last: EntryId, made: list[Watched], let_go: asyncio.Event) -> None:
        super().__init__(last=last)
        self.let_go = let_go
        made.append(self)

    def hold_within(self, entry: EntryId, payload: bytes, bound: int) -> int:
        dropped = super().hold_within(entry, payload, bound)
        if dropped:
            self.let_go.set()
        return dropped


def small_buffers(addr: Any) -> socket.socket:
    # A reader that pauses holds up the refill after a few hundred KB, not
    # after the megabytes the kernel would otherwise buffer on loopback.
    family, kind, proto, _, _ = addr
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    return sock


def post(pid: str, size: int) -> bytes:
    return orjson.dumps({"id": pid, "author": "bookie", "text": "x" * size, "events": ["derby"]})


class Refill:
    """A reader of FEED; two pages of history the live channel never carried,
    the second one short and ~1.5 MB; the live connection killed. Once the
    reader has the first item of the second page, the refill has read the
    last of the history it knows of, and it cannot finish that page while
    the reader pauses."""

    PAGE = 1000

    def __init__(self, server: TestServer, redis: aioredis.Redis, settings: Settings) -> None:
        self.server, self.redis, self.settings = server, redis, settings
        self.made: list[Watched] = []
        self.let_go = asyncio.Event()
        self.ids: list[str] = []  # every item of the feed, in order
        self.got: list[str] = []  # cursors of the post items the readers got, in order

    async def start(self, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        ws = await session.ws_connect(self.server.make_url("/v1/ws"))
        await ws.send_str(orjson.dumps({"op": "subscribe", "ref": 1, "feed": FEED}).decode())
        assert orjson.loads((await ws.receive()).data)["op"] == "subscribed"
        for conn in self.server.app[HUB].connections:
            conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        await self.redis.hset(keys.feed_meta(FEED), "epoch", EPOCH)
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in range(2 * self.PAGE - 1):
                pid = f"{n + 1}-0"
                pipe.xadd(keys.feed_stream(FEED), {"t": "post", "pid": pid, "p": post(pid, 100 if n < self.PAGE else 1500)})
            self.ids = [i.decode() for i in await pipe.execute()]
        await self.redis.client_kill_filter(_type="pubsub")
        await self.read(ws, self.PAGE + 1)
        return ws

    async def read(self, ws: aiohttp.ClientWebSocketResponse, n: int) -> None:
        """Read until `n` more post items came."""
        until = len(self.got) + n
        while len(self.got) < until:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.TEXT, f"closed {ws.close_code} after {len(self.got)} items"
            frame = orjson.loads(msg.data)
            if frame["op"] == "post":
                self.got.append(frame["cursor"])

    async def live(self, n: int) -> None:
        """Append `n` posts and publish them live with the feed script, as the worker does."""
        self.ids += await self.publish(FEED, [f"{k}-9" for k in range(len(self.ids) + 1, len(self.ids) + n + 1)], 500)

    async def publish(self, feed: str, pids: list[str], size: int) -> list[str]:
        """Posts `pids` appended to `feed` and published live; their entry ids."""
        posts: list[bytes | str] = []
        for pid in pids:
            posts += [pid, post(pid, size)]
        n = len(pids)
        ids = await store.Scripts.register(self.redis).feed_append(
            keys=keys.feed_keys(feed),
            args=[self.settings.feed_history_len, EPOCH, n, *posts, keys.feed_channel(feed), feed, n, *range(1, n + 1)],
        )
        return [i.decode() for i in ids]

    def entries(self) -> list[str]:
        return [cursor.rsplit(".", 1)[1] for cursor in self.got]


@pytest.fixture
async def reader_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_buffers)) as s:
        yield s


@pytest.fixture
async def refill(
    start_server: Any, settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Refill:
    settings = settings.replace(socket_buffer_bytes=BOUND, replay_page=Refill.PAGE)
    r = Refill(await start_server(settings, with_worker=False), redis, settings)
    monkeypatch.setattr(hub_module, "Handoff", lambda last: Watched(last, r.made, r.let_go))
    return r


async def test_live_items_past_the_bound_during_a_refill_come_once_from_the_history(
    refill: Refill, reader_session: aiohttp.ClientSession
) -> None:
    ws = await refill.start(reader_session)
    # While the reader pauses, ~2.5 bounds of live items come: held, then let
    # go. None is in the page the refill read last: only a further read of
    # the history finds the ones let go.
    await refill.live(240)
    await asyncio.wait_for(refill.let_go.wait(), 4)  # before the refill would close the paused reader

    await refill.read(ws, len(refill.ids) - len(refill.got))
    await refill.live(1)  # an item sent twice at the very end would come before this one
    await refill.read(ws, 1)
    assert refill.entries() == refill.ids

    (handoff,) = refill.made
    assert handoff.dropped > 0 and 0 < handoff.peak <= BOUND, (handoff.dropped, handoff.peak)
    metric = refill.server.app[METRICS].registry.get_sample_value("streamd_refill_dropped_items_total")
    assert metric == handoff.dropped


async def test_a_refill_that_cannot_catch_up_closes_its_readers_to_resume(
    refill: Refill, reader_session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "RESYNC_PASSES", 0)  # items let go once are once too many
    ws = await refill.start(reader_session)
    await refill.live(240)
    await asyncio.wait_for(refill.let_go.wait(), 4)

    with pytest.raises(AssertionError, match="closed 1001"):
        await refill.read(ws, len(refill.ids) - len(refill.got))
    assert len(refill.got) < len(refill.ids)
    # The reader resumes from its last cursor: the rest, then live items.
    ws = await reader_session.ws_connect(refill.server.make_url("/v1/ws"))
    await ws.send_str(orjson.dumps({"op": "subscribe", "ref": 1, "feed": FEED, "cursor": refill.got[-1]}).decode())
    subscribed = orjson.loads((await ws.receive()).data)
    assert subscribed["op"] == "subscribed" and not subscribed["gap"], subscribed
    await refill.read(ws, len(refill.ids) - len(refill.got))
    await refill.live(1)
    await refill.read(ws, 1)
    assert refill.entries() == refill.ids


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the server closes `ws`; its close code."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code
        assert msg.type == aiohttp.WSMsgType.TEXT, msg


async def _subscriber(refill: Refill, session: aiohttp.ClientSession, feed: str = FEED) -> aiohttp.ClientWebSocketResponse:
    """A socket subscribed to `feed` (no cursor)."""
    ws = await session.ws_connect(refill.server.make_url("/v1/ws"))
    await ws.send_str(orjson.dumps({"op": "subscribe", "ref": 1, "feed": feed}).decode())
    assert orjson.loads((await ws.receive()).data)["op"] == "subscribed"
    return ws


async def _resumed_with_a_gap(
    refill: Refill, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, n: int
) -> tuple[aiohttp.ClientWebSocketResponse, list[str]]:
    """`ws` closed 1001 and resumed from the last cursor it got: the resume says
    `gap: true`; the new socket, and the cursors of the next `n` items."""
    assert await _closed(ws) == 1001
    ws = await session.ws_connect(refill.server.make_url("/v1/ws"))
    await ws.send_str(orjson.dumps({"op": "subscribe", "ref": 1, "feed": FEED, "cursor": refill.got[-1]}).decode())
    subscribed = orjson.loads((await ws.receive()).data)
    assert subscribed["op"] == "subscribed" and subscribed["gap"] is True, subscribed
    before = len(refill.got)
    await refill.read(ws, n)
    return ws, refill.got[before:]


async def _history_written_offline(redis: aioredis.Redis, n: int) -> list[str]:
    """`n` items in the history that the live channel never carried."""
    async with redis.pipeline(transaction=False) as pipe:
        for k in range(n):
            pid = f"9{k}-0"
            pipe.xadd(keys.feed_stream(FEED), {"t": "post", "pid": pid, "p": post(pid, 10)})
        return [i.decode() for i in await pipe.execute()]


async def test_a_refill_past_trimmed_items_closes_their_readers_to_resume_with_a_gap(
    refill: Refill, reader_session: aiohttp.ClientSession
) -> None:
    behind = await _subscriber(refill, reader_session)
    await refill.live(3)
    await refill.read(behind, 3)

    # While the live connection is down: ten items, of which the history keeps five.
    offline = await _history_written_offline(refill.redis, 10)
    await refill.redis.xtrim(keys.feed_stream(FEED), maxlen=5, approximate=False)
    await refill.redis.hset(keys.feed_meta(FEED), "trimmed", offline[4])
    # A reader that came after the trim has everything up to the head: not behind.
    ahead = await _subscriber(refill, reader_session)
    await refill.redis.client_kill_filter(_type="pubsub")

    ws, got = await _resumed_with_a_gap(refill, reader_session, behind, 5)
    assert [cursor.rsplit(".", 1)[1] for cursor in got] == offline[5:]

    # The other reader stayed, and goes on with the live items, each once.
    refill.got = []
    await refill.live(1)
    await refill.read(ahead, 1)
    await refill.read(ws, 1)
    assert refill.entries() == [refill.ids[-1]] * 2


async def test_a_refill_from_a_lost_history_closes_its_readers_to_resume_with_a_gap(
    refill: Refill, reader_session: aiohttp.ClientSession
) -> None:
    ws = await _subscriber(refill, reader_session)
    await refill.live(3)
    await refill.read(ws, 3)

    # While the live connection is down the history is lost, and a new one begins.
    await refill.redis.delete(keys.feed_stream(FEED), keys.feed_meta(FEED))
    await refill.redis.hset(keys.feed_meta(FEED), "epoch", "e2")
    fresh = await _history_written_offline(refill.redis, 2)
    await refill.redis.client_kill_filter(_type="pubsub")

    ws, got = await _resumed_with_a_gap(refill, reader_session, ws, 2)
    assert got == [f"e2.{i}" for i in fresh]


async def test_feeds_waiting_for_their_refill_share_one_bound(
    refill: Refill, reader_session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_module, "WAITING_BOUNDS", 1)
    others: dict[str, aiohttp.ClientWebSocketResponse] = {}
    for feed in ("event:oaks", "event:ascot"):
        others[feed] = await _subscriber(refill, reader_session, feed)
    ws = await refill.start(reader_session)  # FEED's refill now waits for its paused reader
    # Break the live stream again: the other feeds wait for their turn (if
    # they were not waiting already), holding the live items they get.
    hub = refill.server.app[HUB]
    reconnects = hub.live.reconnects
    await refill.redis.client_kill_filter(_type="pubsub")
    while hub.live.reconnects == reconnects or any(hub._by_feed[f].resync is None for f in others):
        await asyncio.sleep(0.005)
    assert hub._by_feed[FEED].resync is not None

    # 40 KB for each: within one feed's bound, not within the one the two share.
    sent = {feed: await refill.publish(feed, [f"{k}-7" for k in range(1, 41)], 1000) for feed in others}
    await asyncio.wait_for(refill.let_go.wait(), 10)

    await refill.read(ws, len(refill.ids) - len(refill.got))
    for feed, other in others.items():
        got: list[str] = []
        while len(got) < len(sent[feed]):
            msg = await asyncio.wait_for(other.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.TEXT, f"{feed} closed {other.close_code} after {len(got)} items"
            frame = orjson.loads(msg.data)
            if frame["op"] == "post":
                got.append(frame["cursor"].rsplit(".", 1)[1])
        assert got == sent[feed]
    assert refill.entries() == refill.ids
    assert hub._held == 0
