"""Rate limits and their errors: posts per token, connections per IP, frames per socket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.helpers import Api


async def test_posts_per_minute(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(posts_per_minute=3))
    api = Api(session, str(srv.make_url("")).rstrip("/"))
    token = await api.user("busy")
    for i in range(3):
        await api.post(token, f"p{i}")
    status, body = await api.call("POST", "/v1/posts", {"text": "one too many"}, token)
    assert status == 429 and body["error"]["code"] == "rate_limited"


async def test_new_connections_per_ip(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(connections_per_second=0.01, connections_burst=3))
    url = srv.make_url("/v1/ws")
    opened = [await session.ws_connect(url) for _ in range(3)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(url)
    assert info.value.status == 429
    await asyncio.gather(*(ws.close() for ws in opened))


async def test_too_many_frames_close_4029(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(frames_per_second=0.01, frames_burst=5))
    ws = await session.ws_connect(srv.make_url("/v1/ws"))
    for i in range(6):
        await ws.send_json({"op": "ping", "ref": i})
    pongs = []
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        pongs.append(msg.json()["ref"])
    assert pongs == [0, 1, 2, 3, 4]
    assert ws.close_code == 4029


async def test_embed_token_errors(api: Api) -> None:
    owner = await api.user("owner")
    other = await api.user("other")
    cases = [
        ({"feed": "user:owner", "ttl_seconds": 0}, owner, 400),
        ({"feed": "user:owner", "ttl_seconds": 10**9}, owner, 400),
        ({"feed": "user:owner", "ttl_seconds": "60"}, owner, 400),
        ({"feed": "nope"}, owner, 400),
        ({"feed": "user:owner", "extra": 1}, owner, 400),
        ({"feed": "user:owner"}, other, 403),
        ({"feed": "event:derby"}, owner, 403),
        ({"feed": "list:missing"}, owner, 404),
        ({"feed": "user:owner"}, None, 401),
    ]
    for body, token, status in cases:
        got, reply = await api.call("POST", "/v1/embed-tokens", body, token)
        assert got == status, (body, reply)
    status, reply = await api.call("POST", "/v1/embed-tokens", {"feed": "user:owner", "ttl_seconds": 60}, owner)
    assert status == 201 and reply["token"].startswith("sde_") and reply["feed"] == "user:owner"


async def test_expired_embed_token_closes_4001(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(heartbeat_seconds=0.5))
    api = Api(session, str(srv.make_url("")).rstrip("/"))
    owner = await api.user("owner")
    status, reply = await api.call("POST", "/v1/embed-tokens", {"feed": "user:owner", "ttl_seconds": 1}, owner)
    ws = await session.ws_connect(srv.make_url("/v1/ws"))
    await ws.send_json({"op": "auth", "token": reply["token"], "ref": 1})
    assert (await ws.receive_json(timeout=10))["op"] == "ok"
    while True:
        msg = await ws.receive(timeout=10)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
    assert ws.close_code == 4001


async def _upgrade(session: aiohttp.ClientSession, url: Any, forwarded: str) -> int:
    """The status of a WebSocket upgrade with this X-Forwarded-For (101 or the refusal)."""
    try:
        ws = await session.ws_connect(url, headers={"X-Forwarded-For": forwarded})
    except aiohttp.WSServerHandshakeError as err:
        return err.status
    await ws.close()
    return 101


async def test_new_connections_per_forwarded_ip(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(
        settings.replace(connections_per_second=0.01, connections_burst=2, trust_forwarded_for=True)
    )
    url = srv.make_url("/v1/ws")
    # The proxy appended 10.0.0.7: what the client wrote before it changes nothing.
    assert await _upgrade(session, url, "1.1.1.1, 10.0.0.7") == 101
    assert await _upgrade(session, url, "2.2.2.2,10.0.0.7") == 101
    assert await _upgrade(session, url, "3.3.3.3, 10.0.0.7") == 429
    assert await _upgrade(session, url, "10.0.0.7") == 429
    # Another client behind the same proxy has its own allowance.
    assert await _upgrade(session, url, "10.0.0.7, 10.0.0.8") == 101


async def test_forwarded_ip_behind_a_chain_of_proxies(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(
        settings.replace(
            connections_per_second=0.01, connections_burst=1, trust_forwarded_for=True, forwarded_for_hops=2
        )
    )
    url = srv.make_url("/v1/ws")
    # A CDN appended the client (10.0.0.9), the load balancer the CDN's edge.
    assert await _upgrade(session, url, "6.6.6.6, 10.0.0.9, 172.16.0.1") == 101
    assert await _upgrade(session, url, "7.7.7.7, 10.0.0.9, 172.16.0.2") == 429
    assert await _upgrade(session, url, "10.0.0.10, 172.16.0.1") == 101
    # Too few entries to have come through both proxies: the peer's address counts.
    assert await _upgrade(session, url, "10.0.0.11") == 101
    assert await _upgrade(session, url, "10.0.0.12") == 429
