"""The Python client and `streamd tail | post`: pure parts, then against the real app."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from streamd.app import HUB
from streamd.client import (
    AuthError,
    ClientError,
    FeedError,
    Gap,
    Item,
    StreamClient,
    Subscribed,
    Subscriptions,
    backoff_delay,
    create_post,
    is_after,
)
from streamd.tail import Seen, format_item
from tests.helpers import ADMIN_TOKEN, Api

TIMEOUT = 10.0

# -- pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cursor", "last", "after"),
    [
        ("e1.5-0", None, True),
        ("e1.5-1", "e1.5-0", True),
        ("e1.6-0", "e1.5-9", True),
        ("e1.5-0", "e1.5-0", False),
        ("e1.4-9", "e1.5-0", False),
        ("e2.1-0", "e1.5-0", True),  # a new history
        ("e1.1-0", "0.0-0", True),  # the head of a feed that was empty
        ("weird", "weird", False),
        ("weird2", "weird", True),
    ],
)
def test_is_after(cursor: str, last: str | None, after: bool) -> None:
    assert is_after(cursor, last) is after


def test_backoff_is_full_jitter_under_the_cap() -> None:
    assert backoff_delay(0, 0.1, 10.0, lambda: 0.5) == pytest.approx(0.05)
    assert backoff_delay(3, 0.1, 10.0, lambda: 0.999) == pytest.approx(0.7992)
    assert backoff_delay(10_000, 0.1, 10.0, lambda: 0.5) == pytest.approx(5.0)
    assert backoff_delay(4, 0.1, 10.0, lambda: 0.0) == 0.0


def _post_frame(feed: str, cursor: str, pid: str) -> dict[str, Any]:
    return {"op": "post", "feed": feed, "cursor": cursor, "post": {"id": pid}}


def test_subscriptions_resume_from_the_last_item_and_drop_repeats() -> None:
    subs = Subscriptions(["user:a", "event:x"], {"event:x": "e.1-0"}, backlog=5)
    assert subs.requests("tok") == [
        {"op": "auth", "ref": "auth", "token": "tok"},
        {"op": "subscribe", "feed": "user:a", "backlog": 5},
        {"op": "subscribe", "feed": "event:x", "cursor": "e.1-0"},
    ]
    assert subs.on_frame({"op": "subscribed", "feed": "user:a", "cursor": "e.9-0", "gap": False}) == Subscribed(
        "user:a", "e.9-0", False
    )
    # The backlog is older than the head but still delivered...
    backlog_item = Item("user:a", "post", "e.8-0", {"id": "8-0"}, "8-0")
    assert subs.on_frame(_post_frame("user:a", "e.8-0", "8-0")) == backlog_item
    assert subs.on_frame(_post_frame("user:a", "e.8-0", "8-0")) is None
    assert subs.on_frame(_post_frame("event:x", "e.1-0", "1-0")) is None  # at the resume cursor
    deleted = subs.on_frame({"op": "delete", "feed": "event:x", "cursor": "e.2-0", "post_id": "1-0"})
    assert deleted == Item("event:x", "delete", "e.2-0", None, "1-0")
    assert subs.on_frame({"op": "heartbeat", "ts": 1}) is None
    assert subs.on_frame(_post_frame("user:zzz", "e.3-0", "3-0")) is None  # not ours
    # ... and a new socket resumes each feed from its last item.
    assert subs.requests(None) == [
        {"op": "subscribe", "feed": "user:a", "cursor": "e.8-0"},
        {"op": "subscribe", "feed": "event:x", "cursor": "e.2-0"},
    ]


def test_subscriptions_resume_from_the_head_before_any_item() -> None:
    subs = Subscriptions(["user:a"])
    subs.requests(None)
    subs.on_frame({"op": "subscribed", "feed": "user:a", "cursor": "0.0-0", "gap": False})
    assert subs.requests(None) == [{"op": "subscribe", "feed": "user:a", "cursor": "0.0-0"}]


def test_subscriptions_errors() -> None:
    subs = Subscriptions(["list:gone", "user:a"])
    with pytest.raises(FeedError) as err:
        subs.on_frame({"op": "error", "code": "not_found", "message": "no such list", "feed": "list:gone"})
    assert (err.value.feed, err.value.code) == ("list:gone", "not_found")
    assert subs.feeds == ["user:a"]
    with pytest.raises(AuthError):
        subs.on_frame({"op": "error", "ref": "auth", "code": "unauthorized", "message": "unknown token"})
    with pytest.raises(ValueError):
        Subscriptions([])
    with pytest.raises(ValueError):
        Subscriptions(["user:a"], {"user:b": "e.1-0"})


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_format_item(utc: None) -> None:
    created = 1732212345678  # 2024-11-21 18:05:45.678 UTC
    post: dict[str, Any] = {
        "id": "1732212345678-0",
        "author": "alice",
        "text": "Great finish!\nSee you next year",
        "events": ["derby-2026", "cup"],
        "media": [{"url": "https://x.test/a.jpg", "type": "image"}],
        "created_at": created,
    }
    item = Item("user:alice", "post", "e.1732212345678-0", post, post["id"])
    assert format_item(item) == (
        "18:05:45 @alice Great finish!\n"
        "         See you next year  #derby-2026 #cup\n"
        "         [image] https://x.test/a.jpg"
    )
    short = {**post, "text": "hi", "events": [], "media": []}
    assert format_item(Item("user:alice", "post", "c", short, "1-0")) == "18:05:45 @alice hi"
    assert format_item(Item("user:alice", "delete", "c", None, "1-0")) == "-- deleted 1-0"
    assert "user:alice" in format_item(Gap("user:alice"))


def test_format_item_does_not_pass_terminal_escapes() -> None:
    post = {"author": "eve", "text": "\x1b[2Jgone\u202eevil\tx", "created_at": 0}
    line = format_item(Item("user:eve", "post", "c", post, "1-0"))
    assert "\x1b" not in line and "\u202e" not in line
    assert line.endswith("@eve \\x1b[2Jgone\\u202eevil x")


def test_seen_prints_a_post_of_several_feeds_once() -> None:
    seen = Seen(size=2)
    a = Item("user:a", "post", "c1", {}, "1-0")
    assert seen.first(a)
    assert not seen.first(Item("event:x", "post", "c9", {}, "1-0"))
    assert seen.first(Item("event:x", "delete", "c10", None, "1-0"))
    assert seen.first(Gap("event:x")) and seen.first(Gap("event:x"))
    assert seen.first(Item("user:a", "post", "c2", {}, "2-0"))
    assert seen.first(a)  # forgotten: the memory is bounded


# -- against the real app ---------------------------------------------------------------


class Watch:
    """Test-side bookkeeping of a client's callbacks."""

    def __init__(self) -> None:
        self.subscribed: list[str] = []
        self.reconnects: list[str] = []
        self.changed = asyncio.Event()

    def on_subscribed(self, feed: str, head: str) -> None:
        self.subscribed.append(feed)
        self.changed.set()

    def on_reconnect(self, reason: str, delay: float) -> None:
        self.reconnects.append(reason)
        self.changed.set()

    async def until(self, predicate: Any) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def client(self, url: str, feeds: list[str], **kwargs: Any) -> StreamClient:
        return StreamClient(url, feeds, on_subscribed=self.on_subscribed, on_reconnect=self.on_reconnect, **kwargs)


async def take(client: StreamClient, n: int) -> list[Item | Gap]:
    return [await asyncio.wait_for(anext(client), TIMEOUT) for _ in range(n)]


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def by_feed(items: list[Item | Gap]) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for item in items:
        assert isinstance(item, Item) and item.op == "post", item
        out.setdefault(item.feed, []).append(item.post_id)
    return out


async def test_yields_posts_of_two_feeds(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    watch = Watch()
    async with watch.client(api.base, ["user:alice", "user:bob"]) as client:
        first = asyncio.create_task(anext(client))
        await watch.until(lambda: len(watch.subscribed) == 2)
        a1 = await api.post(alice, "a1")
        b1 = await api.post(bob, "b1")
        a2 = await api.post(alice, "a2")
        items = [await asyncio.wait_for(first, TIMEOUT), *await take(client, 2)]
    assert by_feed(items) == {"user:alice": [a1["id"], a2["id"]], "user:bob": [b1["id"]]}
    by_id = {i.post_id: i for i in items if isinstance(i, Item)}
    assert by_id[a1["id"]].post == a1
    assert client.cursors == {"user:alice": by_id[a2["id"]].cursor, "user:bob": by_id[b1["id"]].cursor}


@pytest.mark.parametrize("code", [1001, 4008])
async def test_resumes_after_the_server_closes_the_socket(api: Api, server: TestServer, code: int) -> None:
    alice = await api.user("alice")
    feeds = ["user:alice", "event:derby"]
    watch = Watch()
    async with watch.client(api.base, feeds) as client:
        first = asyncio.create_task(anext(client))
        await watch.until(lambda: len(watch.subscribed) == 2)
        posts = [await api.post(alice, "p1", events=["derby"])]
        items = [await asyncio.wait_for(first, TIMEOUT), *await take(client, 1)]
        hub = server.app[HUB]
        assert len(hub.connections) == 1
        for conn in list(hub.connections):
            hub.kill(conn, code)
        # Nobody reads the client now: these can only reach it by the resume.
        for text in ("p2", "p3", "p4"):
            posts.append(await api.post(alice, text, events=["derby"]))
        items += await take(client, 6)
        assert watch.subscribed.count("user:alice") == 2 and watch.subscribed.count("event:derby") == 2
        assert len(watch.reconnects) == 1 and str(code) in watch.reconnects[0]
        for text in ("p5 live", "p6 live"):
            posts.append(await api.post(alice, text, events=["derby"]))
        items += await take(client, 4)
    ids = [p["id"] for p in posts]
    assert by_feed(items) == {"user:alice": ids, "event:derby": ids}


async def test_a_new_history_is_a_gap_then_everything_retained(api: Api) -> None:
    alice = await api.user("alice")
    p1 = await api.post(alice, "before")
    async with StreamClient(api.base, ["user:alice"], cursors={"user:alice": "otherepoch.1-0"}) as client:
        items = await take(client, 2)
    assert items == [Gap("user:alice"), Item("user:alice", "post", client.cursors["user:alice"], p1, p1["id"])]


@contextlib.asynccontextmanager
async def watch_items(api: Api, feed: str, n: int) -> AsyncIterator[None]:
    """Until `feed`'s history holds `n` items (a resume from its start replays them)."""
    async with StreamClient(api.base, [feed], cursors={feed: "0.0-0"}) as client:
        seen = 0
        while seen < n:  # after a Gap (the cursor is of no epoch): the retained items, then live ones
            seen += sum(isinstance(x, Item) for x in await take(client, 1))
        yield


async def test_backlog_then_live(api: Api) -> None:
    alice = await api.user("alice")
    old = [await api.post(alice, f"old {i}") for i in range(3)]
    # A 201 is not yet fanned out: the backlog is read once the feed holds all three.
    async with watch_items(api, "user:alice", 3):
        pass
    watch = Watch()
    async with watch.client(api.base, ["user:alice"], backlog=2) as client:
        items = await take(client, 2)
        new = await api.post(alice, "new")
        items += await take(client, 1)
    assert by_feed(items) == {"user:alice": [old[1]["id"], old[2]["id"], new["id"]]}


async def test_a_refused_feed_raises_and_the_others_go_on(api: Api) -> None:
    alice = await api.user("alice")
    watch = Watch()
    async with watch.client(api.base, ["list:nosuchlist", "user:alice"]) as client:
        with pytest.raises(FeedError) as err:
            await asyncio.wait_for(anext(client), TIMEOUT)
        assert (err.value.feed, err.value.code) == ("list:nosuchlist", "not_found")
        assert client.feeds == ["user:alice"]
        nxt = asyncio.create_task(anext(client))
        await watch.until(lambda: "user:alice" in watch.subscribed)
        p1 = await api.post(alice, "still here")
        item = await asyncio.wait_for(nxt, TIMEOUT)
    assert isinstance(item, Item) and item.post_id == p1["id"]


async def test_an_unknown_token_stops_with_auth_error(api: Api) -> None:
    async with StreamClient(api.base, ["user:alice"], token="sdu_nope") as client:
        with pytest.raises(AuthError):
            await asyncio.wait_for(anext(client), TIMEOUT)
        with pytest.raises(StopAsyncIteration):
            await anext(client)


async def test_a_revoked_token_stops_with_auth_error(api: Api) -> None:
    await api.user("alice")
    status, body = await api.call("POST", "/v1/users/alice/tokens", None, ADMIN_TOKEN)
    assert status == 201, body
    watch = Watch()
    async with watch.client(api.base, ["user:alice"], token=body["token"]) as client:
        nxt = asyncio.create_task(anext(client))
        await watch.until(lambda: watch.subscribed)
        status, _ = await api.call("DELETE", f"/v1/users/alice/tokens/{body['token_id']}", None, ADMIN_TOKEN)
        assert status == 204
        with pytest.raises(AuthError):
            await asyncio.wait_for(nxt, TIMEOUT)
    assert watch.reconnects == []


async def test_a_silent_socket_is_dropped_after_the_heartbeat_deadline() -> None:
    accepted = 0

    async def silent(request: web.Request) -> web.WebSocketResponse:
        nonlocal accepted
        accepted += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:  # reads the subscribes, never answers
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/ws", silent)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        watch = Watch()
        url = str(server.make_url("")).rstrip("/")
        async with watch.client(url, ["user:alice"], heartbeat_seconds=0.05) as client:
            nxt = asyncio.create_task(anext(client))
            await watch.until(lambda: len(watch.reconnects) >= 2)
            await cancel(nxt)
        assert watch.reconnects[0] == "no frame for 0.1 s" and accepted >= 2
    finally:
        await server.close()


async def test_a_refused_connection_is_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    watch = Watch()
    async with watch.client(f"http://127.0.0.1:{port}", ["user:alice"], backoff_base=0.01) as client:
        nxt = asyncio.create_task(anext(client))
        await watch.until(lambda: len(watch.reconnects) >= 3)
        await cancel(nxt)
    assert all(str(port) in reason for reason in watch.reconnects)


async def test_create_post_and_its_errors(api: Api) -> None:
    alice = await api.user("alice")
    post = await create_post(api.base, alice, "hello", events=["derby"], idempotency_key="k1")
    assert post["text"] == "hello" and post["events"] == ["derby"]
    assert (await create_post(api.base, alice, "ignored", idempotency_key="k1"))["id"] == post["id"]
    with pytest.raises(ClientError) as err:
        await create_post(api.base, alice, "")
    assert (err.value.status, err.value.code) == (400, "bad_request") and err.value.message
    with pytest.raises(AuthError) as auth:
        await create_post(api.base, "sdu_nope", "hello")
    assert (auth.value.status, auth.value.code) == (401, "unauthorized")


# -- the command line, as subprocesses ----------------------------------------------------


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}


async def _streamd(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or _env(),
    )  # fmt: skip


async def _line(stream: asyncio.StreamReader | None) -> str:
    assert stream is not None
    line = await asyncio.wait_for(stream.readline(), TIMEOUT)
    assert line, "the process closed its output"
    return line.decode().rstrip("\n")


async def test_streamd_post(api: Api) -> None:
    alice = await api.user("alice")
    proc = await _streamd("post", "from the shell", "--event", "derby", "--url", api.base, "--token", alice)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err
    status, body = await api.call("GET", f"/v1/posts/{out.decode().strip()}")
    assert status == 200 and body["post"]["text"] == "from the shell" and body["post"]["events"] == ["derby"]

    env = {**_env(), "STREAMD_URL": api.base, "STREAMD_TOKEN": alice}
    proc = await _streamd("post", " ", env=env)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 1 and out == b""
    assert err.decode().startswith("streamd post: bad_request: ") and b"Traceback" not in err


@pytest.fixture
async def tail_proc(api: Api) -> AsyncIterator[Any]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(*feeds: str) -> asyncio.subprocess.Process:
        proc = await _streamd("tail", *feeds, "--url", api.base)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_streamd_tail_prints_new_posts_and_stops_on_sigint(api: Api, tail_proc: Any) -> None:
    alice = await api.user("alice")
    proc = await tail_proc("user:alice", "event:derby")
    assert sorted([await _line(proc.stderr), await _line(proc.stderr)]) == [
        "-- subscribed to event:derby",
        "-- subscribed to user:alice",
    ]
    await api.post(alice, "And they're off", events=["derby"])
    line = await _line(proc.stdout)
    assert line.endswith(" @alice And they're off  #derby") and line[2] == ":" == line[5]
    # The post reached both feeds and printed once: the next line is the next post.
    second = await api.post(alice, "second")
    assert (await _line(proc.stdout)).endswith(" @alice second")
    status, _ = await api.call("DELETE", f"/v1/posts/{second['id']}", None, alice)
    assert status == 204
    assert await _line(proc.stdout) == f"-- deleted {second['id']}"

    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    assert proc.stderr is not None
    assert b"Traceback" not in await proc.stderr.read()


async def test_streamd_tail_exits_1_when_every_feed_is_refused(api: Api, tail_proc: Any) -> None:
    proc = await tail_proc("list:nosuchlist")
    assert (await _line(proc.stderr)).startswith("streamd tail: list:nosuchlist: not_found: ")
    assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 1
