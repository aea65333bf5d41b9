"""Prometheus metrics: `/metrics` scraped from the real app, and the worker's own counts."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from streamd import keys
from streamd.fanout import FanoutWorker
from streamd.metrics import Metrics
from streamd.settings import Settings
from streamd.sse import sse_chunk
from streamd.wsframe import text_frame
from tests.helpers import TIMEOUT, Api, WsClient
from tests.test_fanout import ingest
from tests.test_sse import open_sse


class Scrape:
    """One scrape of /metrics: sample values by name and labels (0 when absent)."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values


async def scrape(api: Api) -> Scrape:
    async with api.session.get(api.base + "/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain", resp
        return Scrape(await resp.text())


async def scrape_until(api: Api, name: str, value: float, **labels: str) -> Scrape:
    """Scrape until `name` shows `value`, for what a client cannot see happen
    (the worker's counts after its writes, a reconnect); bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        got = await scrape(api)
        if got(name, **labels) == value or loop.time() > deadline:
            return got


async def test_a_post_read_over_websocket_and_sse(api: Api, ws_connect: Any) -> None:
    jane = await api.user("jane")
    ws = await ws_connect()
    await ws.subscribe("user:jane")  # answered once the socket is live
    first = await api.post(jane, "first")
    assert (await ws.recv())["post"]["id"] == first["id"]  # so it is in the history now
    # The backlog item is queued just before the reader goes live: once it is here, the reader is live.
    sse = await open_sse(api, "/v1/feeds/user:jane/events?backlog=1")
    assert (await sse.event())["data"]["post"]["id"] == first["id"]
    before = await scrape_until(api, "streamd_posts_fanned_out_total", 1)

    second = await api.post(jane, "second", idempotency_key="once")
    status, again = await api.call("POST", "/v1/posts", {"text": "second", "idempotency_key": "once"}, jane)
    assert status == 201 and again["post"] == second  # a repeat: not a new post
    msg = await ws.ws.receive(timeout=TIMEOUT)
    payload = msg.data.encode()
    assert orjson.loads(payload)["post"] == second
    assert (await sse.event())["data"] == orjson.loads(payload)
    after = await scrape_until(api, "streamd_posts_fanned_out_total", 2)

    def moved(name: str, **labels: str) -> float:
        return after(name, **labels) - before(name, **labels)

    assert moved("streamd_posts_accepted_total") == 1
    assert moved("streamd_delivered_items_total") == 2
    assert moved("streamd_delivered_bytes_total") == len(text_frame(payload)) + len(sse_chunk(payload))
    assert moved("streamd_delivery_latency_seconds_count") == 1  # once per message, not per reader
    assert moved("streamd_posts_fanned_out_total") == 1
    assert moved("streamd_feed_items_written_total") == 1  # user:jane only
    assert moved("streamd_ingest_lag_seconds_count") == 1
    assert after("streamd_connections", kind="ws") == 1 and after("streamd_connections", kind="sse") == 1
    assert after("streamd_subscriptions", kind="user") == 2
    assert after("streamd_subscriptions", kind="list") == after("streamd_subscriptions", kind="event") == 0
    assert after("streamd_live_feeds") == 1
    # With one worker the sample is taken between batches, when nothing is pending.
    assert after.has("streamd_ingest_pending", shard="0") and after("streamd_ingest_pending", shard="0") == 0
    assert after("streamd_slow_closes_total") == after("streamd_replays_total") == 0

    await ws.ws.close()  # the server sees the close in its own time
    gone = await scrape_until(api, "streamd_connections", 0, kind="ws")
    assert gone("streamd_connections", kind="ws") == 0 and gone("streamd_connections", kind="sse") == 1
    assert gone("streamd_subscriptions", kind="user") == 1 and gone("streamd_live_feeds") == 1
    assert not gone.has("streamd_closes_total", code="1000")  # closes by clients are not counted
    sse.response.close()


async def test_resumes_and_gaps(api: Api, ws_connect: Any) -> None:
    jane = await api.user("jane")
    ws = await ws_connect()
    await ws.subscribe("user:jane")
    await api.post(jane, "seen")
    cursor = (await ws.recv())["cursor"]
    resumed = await ws_connect()
    assert (await resumed.subscribe("user:jane", cursor=cursor))["gap"] is False
    lost = await ws_connect()  # a cursor from another epoch of the feed's history
    assert (await lost.subscribe("user:jane", cursor="ffffffff.1-0"))["gap"] is True
    got = await scrape(api)
    assert got("streamd_replays_total") == 2 and got("streamd_replay_gaps_total") == 1
    assert got("streamd_subscriptions", kind="user") == 3


async def test_slow_reader_closed_with_4008_is_counted(
    start_server: Any, settings: Settings, session: aiohttp.ClientSession
) -> None:
    srv = await start_server(settings.replace(socket_buffer_bytes=512))
    api = Api(session, str(srv.make_url("")).rstrip("/"))
    slow = await api.user("slow")
    ws = WsClient(await session.ws_connect(srv.make_url("/v1/ws")))
    await ws.subscribe("user:slow")
    # Not read from here on. One item of 1000 characters is more than the
    # socket may hold, however fast the client would read.
    await api.post(slow, "x" * 1000)
    assert await ws.closed() == 4008
    got = await scrape(api)
    assert got("streamd_slow_closes_total") == 1
    assert got("streamd_closes_total", code="4008") == 1
    assert got("streamd_connections", kind="ws") == 0 and got("streamd_subscriptions", kind="user") == 0


async def test_live_channel_reconnect_is_counted(api: Api, ws_connect: Any, redis: aioredis.Redis) -> None:
    ws = await ws_connect()
    await ws.subscribe("event:derby")
    assert (await scrape(api))("streamd_live_reconnects_total") == 0
    await redis.client_kill_filter(_type="pubsub")  # the app's live connection, the only subscriber
    got = await scrape_until(api, "streamd_live_reconnects_total", 1)
    assert got("streamd_live_reconnects_total") == 1 and got("streamd_live_feeds") == 1


async def test_worker_counts_claims_dead_letters_and_pending(redis: aioredis.Redis, settings: Settings) -> None:
    metrics = Metrics()
    worker = FanoutWorker(redis, settings.replace(claim_idle_ms=0), consumer="rescuer", metrics=metrics)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    await worker.ensure_group()
    await ingest(redis, "carol", "hi", ["race-1"])
    # Another consumer takes the entry and dies before writing anything.
    assert await redis.xreadgroup(keys.FANOUT_GROUP, "doomed", {keys.ingest_stream(): ">"})
    await worker.trim_ingest()
    assert value("streamd_ingest_pending", shard="0") == 1
    assert await worker.claim_stale() == 1
    await worker.trim_ingest()
    assert value("streamd_ingest_pending", shard="0") == 0
    assert value("streamd_claimed_entries_total") == 1
    assert value("streamd_posts_fanned_out_total") == 1
    assert value("streamd_feed_items_written_total") == 2  # user:carol, event:race-1
    assert value("streamd_ingest_lag_seconds_count") == 2

    await redis.xadd(keys.ingest_stream(), {"a": "carol"})  # no body: unparseable
    assert await worker.step() == 1
    assert value("streamd_dead_letters_total") == 1
    assert value("streamd_posts_fanned_out_total") == 1
    # The same entry again writes nothing: the posts are in their feeds already.
    oldest: Any = await redis.xrange(keys.ingest_stream(), count=1)
    await worker.write_feeds(oldest)
    assert value("streamd_feed_items_written_total") == 2 and value("streamd_ingest_lag_seconds_count") == 2
