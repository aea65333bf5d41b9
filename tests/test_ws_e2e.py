"""End to end over a real WebSocket: post -> Redis -> fan-out worker -> gateway -> client."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Any

import aiohttp

from streamd import cursors
from streamd.http_base import HUB
from tests.helpers import Api


async def test_post_reaches_subscriber(api: Api, ws_connect: Any) -> None:
    token = await api.user("alice")
    ws = await ws_connect()
    reply = await ws.subscribe("user:alice")
    assert reply == {"op": "subscribed", "ref": 1, "feed": "user:alice", "cursor": "0.0-0", "gap": False}

    post = await api.post(token, "Gate 4 looks sharp today", events=["derby-2026"])
    frame = await ws.recv()
    assert frame["op"] == "post"
    assert frame["feed"] == "user:alice"
    assert frame["post"] == post
    assert post["author"] == "alice" and post["text"] == "Gate 4 looks sharp today"
    assert post["events"] == ["derby-2026"] and post["media"] == []
    assert post["created_at"] == int(post["id"].split("-")[0])
    assert cursors.decode(frame["cursor"]).entry > (0, 0)


async def test_post_reaches_every_subscriber_once_in_order(api: Api, ws_connect: Any) -> None:
    token = await api.user("bob")
    clients = [await ws_connect() for _ in range(5)]
    for ws in clients:
        await ws.subscribe("user:bob")
    posts = [await api.post(token, f"post {i}") for i in range(20)]
    for ws in clients:
        frames = await ws.items(20)
        assert [f["post"]["id"] for f in frames] == [p["id"] for p in posts]
        got = [cursors.decode(f["cursor"]).entry for f in frames]
        assert got == sorted(got) and len(set(got)) == 20
    # Nothing was sent twice: the next frame on each socket is a fresh post.
    marker = await api.post(token, "marker")
    for ws in clients:
        assert (await ws.recv())["post"]["id"] == marker["id"]


async def test_resume_with_cursor_gets_exactly_the_missed_posts(api: Api, ws_connect: Any) -> None:
    token = await api.user("carol")
    ws = await ws_connect()
    await ws.subscribe("user:carol")
    first = [await api.post(token, f"before {i}") for i in range(3)]
    seen = await ws.items(3)
    last_cursor = seen[-1]["cursor"]
    await ws.ws.close()

    missed = [await api.post(token, f"missed {i}") for i in range(4)]
    ws2 = await ws_connect()
    reply = await ws2.subscribe("user:carol", cursor=last_cursor)
    assert reply["gap"] is False
    replayed = await ws2.items(4)
    assert [f["post"]["id"] for f in replayed] == [p["id"] for p in missed]

    live = await api.post(token, "after resume")
    frame = await ws2.recv()
    assert frame["post"]["id"] == live["id"]
    assert first[0]["id"] < missed[0]["id"]


async def test_resume_from_first_cursor_replays_all_then_live(api: Api, ws_connect: Any) -> None:
    token = await api.user("dave")
    ws = await ws_connect()
    head = (await ws.subscribe("user:dave"))["cursor"]
    posts = [await api.post(token, f"p{i}") for i in range(10)]
    await ws.items(10)
    ws2 = await ws_connect()
    await ws2.subscribe("user:dave", cursor=head)
    assert [f["post"]["id"] for f in await ws2.items(10)] == [p["id"] for p in posts]


async def test_backlog_sends_last_items_oldest_first(api: Api, ws_connect: Any) -> None:
    token = await api.user("erin")
    probe = await ws_connect()
    await probe.subscribe("user:erin")
    posts = [await api.post(token, f"p{i}") for i in range(6)]
    await probe.items(6)  # all six are in the history now

    ws = await ws_connect()
    reply = await ws.subscribe("user:erin", backlog=3)
    backlog = await ws.items(3)
    assert [f["post"]["id"] for f in backlog] == [p["id"] for p in posts[3:]]
    assert reply["cursor"] == backlog[-1]["cursor"]
    live = await api.post(token, "live")
    assert (await ws.recv())["post"]["id"] == live["id"]


async def test_unsubscribe_stops_delivery(api: Api, ws_connect: Any) -> None:
    a = await api.user("fay")
    b = await api.user("gus")
    ws = await ws_connect()
    await ws.subscribe("user:fay")
    await ws.subscribe("user:gus")
    reply = await ws.request("unsubscribe", feed="user:fay")
    assert reply == {"op": "unsubscribed", "ref": 3, "feed": "user:fay"}
    await api.post(a, "not for you")
    marker = await api.post(b, "marker")
    frame = await ws.recv()
    assert frame["feed"] == "user:gus" and frame["post"]["id"] == marker["id"]


async def test_subscribe_twice_sends_nothing_twice(api: Api, ws_connect: Any) -> None:
    token = await api.user("hal")
    ws = await ws_connect()
    await ws.subscribe("user:hal")
    p1 = await api.post(token, "one")
    assert (await ws.recv())["post"]["id"] == p1["id"]
    again = await ws.subscribe("user:hal", backlog=5)
    assert again["gap"] is False
    p2 = await api.post(token, "two")
    assert (await ws.recv())["post"]["id"] == p2["id"]


async def test_ping_and_auth(api: Api, ws_connect: Any) -> None:
    token = await api.user("ivy")
    ws = await ws_connect()
    assert await ws.request("ping") == {"op": "pong", "ref": 1}
    assert await ws.request("auth", token=token) == {"op": "ok", "ref": 2}
    bad = await ws.request("auth", token="sdu_nope")
    assert bad["op"] == "error" and bad["code"] == "unauthorized"
    assert await ws.request("ping") == {"op": "pong", "ref": 4}  # the socket stays open


async def test_string_refs_are_echoed(ws_connect: Any) -> None:
    ws = await ws_connect()
    await ws.send(op="ping", ref="abc")
    assert await ws.recv() == {"op": "pong", "ref": "abc"}


async def test_bad_frames_get_errors_and_socket_stays_open(ws_connect: Any) -> None:
    ws = await ws_connect()
    cases: list[tuple[str, str]] = [
        ("not json", "bad_request"),
        ("[1,2]", "bad_request"),
        ('{"op":"dance","ref":7}', "bad_request"),
        ('{"op":"subscribe","feed":"planet:mars","ref":8}', "bad_request"),
        ('{"op":"subscribe","feed":"user:Not-Valid","ref":9}', "bad_request"),
        ('{"op":"subscribe","feed":"user:x","backlog":101}', "bad_request"),
        ('{"op":"subscribe","feed":"user:x","cursor":"garbage"}', "bad_request"),
        ('{"op":"ping","extra":1}', "bad_request"),
        ('{"op":"subscribe","feed":"list:nope"}', "not_found"),
    ]
    for text, code in cases:
        await ws.ws.send_str(text)
        frame = await ws.recv()
        assert frame["op"] == "error" and frame["code"] == code, (text, frame)
        assert frame["message"]
    assert (await ws.request("ping"))["op"] == "pong"


async def test_error_carries_ref_and_feed(ws_connect: Any) -> None:
    ws = await ws_connect()
    await ws.send(op="subscribe", feed="user:zed", backlog=-1, ref="r1")
    frame = await ws.recv()
    assert frame["ref"] == "r1" and frame["feed"] == "user:zed" and frame["code"] == "bad_request"


async def test_binary_frame_closes_1003(ws_connect: Any) -> None:
    ws = await ws_connect()
    await ws.ws.send_bytes(b"\x00\x01")
    assert await ws.closed() == 1003


async def test_frame_over_4k_closes_1009(ws_connect: Any) -> None:
    ws = await ws_connect()
    await ws.ws.send_str('{"op":"ping","ref":"' + "x" * 4100 + '"}')
    assert await ws.closed() == 1009


async def test_too_many_malformed_frames_close_1008(ws_connect: Any, settings: Any) -> None:
    ws = await ws_connect()
    for _ in range(settings.max_malformed_frames):
        await ws.ws.send_str("{")
    codes = []
    while True:
        msg = await ws.ws.receive(timeout=10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        codes.append(msg.json()["code"])
    assert codes == ["bad_request"] * settings.max_malformed_frames
    assert ws.ws.close_code == 1008


async def test_too_many_subscriptions(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(max_subscriptions=3))
    ws = await session.ws_connect(srv.make_url("/v1/ws"))
    for i in range(3):
        await ws.send_json({"op": "subscribe", "feed": f"event:race-{i}"})
        assert (await ws.receive_json(timeout=10))["op"] == "subscribed"
    await ws.send_json({"op": "subscribe", "feed": "event:race-9", "ref": 1})
    frame = await ws.receive_json(timeout=10)
    assert frame["code"] == "too_many_subscriptions" and frame["ref"] == 1
    await ws.close()


async def test_heartbeat_after_quiet(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(heartbeat_seconds=0.5))
    ws = await session.ws_connect(srv.make_url("/v1/ws"))
    frame = await ws.receive_json(timeout=10)
    assert frame["op"] == "heartbeat" and isinstance(frame["ts"], int)
    await ws.close()


async def test_event_feed_receives_tagged_posts(api: Api, ws_connect: Any) -> None:
    token = await api.user("jo")
    ws = await ws_connect()
    await ws.subscribe("event:derby-2026")
    await api.post(token, "untagged")
    tagged = await api.post(token, "tagged", events=["derby-2026", "oaks-2026"])
    frame = await ws.recv()
    assert frame["feed"] == "event:derby-2026" and frame["post"]["id"] == tagged["id"]


async def test_a_peer_that_stops_answering_pings_is_dropped(start_server: Any, settings: Any) -> None:
    """A raw client that completes the handshake and then never answers a ping."""
    srv = await start_server(settings.replace(ws_ping_seconds=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 101")
    assert len(srv.app[HUB].connections) == 1
    seen = b""
    while chunk := await asyncio.wait_for(reader.read(4096), 10):  # until the server hangs up
        seen += chunk
    assert b"\x89" in seen  # it was pinged (opcode 0x9) before being dropped
    for _ in range(100):  # the handler lets go of it right after the hang-up
        if not srv.app[HUB].connections:
            break
        await asyncio.sleep(0.01)
    assert not srv.app[HUB].connections
    writer.close()


async def test_live_messages_are_taken_as_they_are(api: Api, ws_connect: Any) -> None:
    # Over RESP3, redis-py's default pub/sub push handler builds a debug line
    # from each whole message whether or not it is logged. The live
    # connection's messages skip it: none reaches that logger, even at DEBUG.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("push_response")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        token = await api.user("tia")
        ws = await ws_connect()
        await ws.subscribe("user:tia")
        post = await api.post(token, "as it is")
        frame = await ws.recv()
        assert frame["post"]["id"] == post["id"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage()[:80] for r in records] == []
