"""Server-Sent Events: the same items and resume semantics as the WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from streamd.http_base import HUB
from tests.helpers import Api


class SseReader:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def event(self, timeout: float = 10) -> dict[str, Any]:
        """The next event (comments skipped): its id, event and parsed data."""
        fields: dict[str, Any] = {}
        while True:
            line = (await asyncio.wait_for(self.response.content.readline(), timeout)).decode()
            assert line, "stream ended"
            line = line.rstrip("\n")
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = orjson.loads(value) if name == "data" else value


async def open_sse(api: Api, path: str, headers: dict[str, str] | None = None) -> SseReader:
    response = await api.session.get(api.base + path, headers=headers or {})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return SseReader(response)


async def test_sse_live_and_delete(api: Api) -> None:
    jane = await api.user("jane")
    sse = await open_sse(api, "/v1/feeds/user:jane/events")
    post = await api.post(jane, "over SSE")
    ev = await sse.event()
    assert ev["event"] == "post" and ev["id"] == ev["data"]["cursor"]
    assert ev["data"]["post"] == post and ev["data"]["feed"] == "user:jane"
    await api.call("DELETE", f"/v1/posts/{post['id']}", None, jane)
    ev = await sse.event()
    assert ev["event"] == "delete" and ev["data"]["post_id"] == post["id"]
    sse.response.close()


async def test_sse_gets_what_is_posted_once_its_headers_arrive(server: Any, api: Api) -> None:
    # The subscription may take a while to be in place after the response
    # starts (under Cluster, a connection to another node first): here each
    # attach waits 300 ms. A post made as soon as the headers arrive is still
    # the stream's first item.
    hub = server.app[HUB]
    attach = hub.attach

    async def slow_attach(*args: Any) -> None:
        await asyncio.sleep(0.3)
        await attach(*args)

    hub.attach = slow_attach
    jane = await api.user("jane")
    await api.post(jane, "before")
    sse = await open_sse(api, "/v1/feeds/user:jane/events")
    post = await api.post(jane, "right after the headers")
    ev = await sse.event()
    assert ev["event"] == "post" and ev["data"]["post"] == post
    sse.response.close()


async def test_sse_resume_with_last_event_id_matches_websocket(api: Api, ws_connect: Any) -> None:
    jane = await api.user("jane")
    ws = await ws_connect()
    await ws.subscribe("user:jane")
    first = await api.post(jane, "seen")
    cursor = (await ws.recv())["cursor"]
    missed = [await api.post(jane, f"missed {i}") for i in range(3)]
    await ws.items(3)

    sse = await open_sse(api, "/v1/feeds/user:jane/events", {"Last-Event-ID": cursor})
    ws2 = await ws_connect()
    await ws2.subscribe("user:jane", cursor=cursor)
    via_ws = [f["post"]["id"] for f in await ws2.items(3)]
    via_sse = [(await sse.event())["data"]["post"]["id"] for _ in range(3)]
    assert via_sse == via_ws == [p["id"] for p in missed]
    live = await api.post(jane, "live")
    assert (await sse.event())["data"]["post"]["id"] == live["id"]
    assert first["id"] not in via_sse
    sse.response.close()

    again = await open_sse(api, f"/v1/feeds/user:jane/events?cursor={cursor}")
    assert [(await again.event())["data"]["post"]["id"] for _ in range(4)] == [p["id"] for p in [*missed, live]]
    again.response.close()


async def test_sse_gap_when_history_was_trimmed(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(feed_history_len=3))
    api = Api(session, str(srv.make_url("")).rstrip("/"))
    jane = await api.user("jane")
    sse = await open_sse(api, "/v1/feeds/user:jane/events")
    posts = [await api.post(jane, f"p{i}") for i in range(8)]
    events = [await sse.event() for _ in range(8)]
    first_cursor = events[0]["id"]
    sse.response.close()

    resumed = await open_sse(api, "/v1/feeds/user:jane/events", {"Last-Event-ID": first_cursor})
    gap = await resumed.event()
    assert gap["event"] == "gap" and gap["data"]["gap"] is True and gap["data"]["feed"] == "user:jane"
    rest = []
    while len(rest) < 3 or rest[-1] != posts[-1]["id"]:
        rest.append((await resumed.event())["data"]["post"]["id"])
    assert rest == [p["id"] for p in posts[-len(rest) :]]
    resumed.response.close()


async def test_sse_refusals_are_http_errors(api: Api) -> None:
    fan = await api.user("fan")
    status, body = await api.call("POST", "/v1/lists", {"name": "p", "visibility": "private"}, fan)
    private = f"list:{body['list']['id']}"
    for path, headers, expected in [
        (f"/v1/feeds/{private}/events", {}, 404),
        ("/v1/feeds/planet:x/events", {}, 400),
        ("/v1/feeds/user:x/events", {"Last-Event-ID": "garbage"}, 400),
        ("/v1/feeds/user:x/events?token=sdu_nope", {}, 401),
    ]:
        async with api.session.get(api.base + path, headers=headers) as resp:
            assert resp.status == expected, path
            assert (await resp.json())["error"]["code"]
    # The owner reads it with ?token= (as EventSource cannot send headers).
    sse = await open_sse(api, f"/v1/feeds/{private}/events?token={fan}")
    sse.response.close()


async def test_sse_keepalive_comment(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    srv = await start_server(settings.replace(sse_keepalive_seconds=0.3))
    async with session.get(srv.make_url("/v1/feeds/event:quiet/events")) as resp:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line.startswith(b": heartbeat")


async def test_sse_stream_ends_when_its_list_is_deleted(api: Api) -> None:
    fan = await api.user("fan")
    status, body = await api.call("POST", "/v1/lists", {"name": "gone soon", "visibility": "public"}, fan)
    feed = f"list:{body['list']['id']}"
    sse = await open_sse(api, f"/v1/feeds/{feed}/events")
    assert (await api.call("DELETE", f"/v1/lists/{body['list']['id']}", None, fan))[0] == 204
    ev = await sse.event()
    assert ev["event"] == "error" and ev["data"]["code"] == "not_found" and ev["data"]["feed"] == feed
    rest = await asyncio.wait_for(sse.response.content.read(), 10)  # the stream ends
    assert b"event:" not in rest
    sse.response.close()
