"""Deleting posts, reading history over HTTP, and getting a post by id."""

from __future__ import annotations

from typing import Any

import pytest

from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, Api


@pytest.fixture(params=[True, False], ids=["fanout-at-accept", "worker-writes"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Every case with the accepting script fanning posts out, and with the worker doing it."""
    return settings.replace(fanout_at_accept=request.param)


async def test_delete_reaches_every_feed_the_post_reached(api: Api, ws_connect: Any) -> None:
    fan = await api.user("fan")
    jane = await api.user("jane")
    status, body = await api.call("POST", "/v1/lists", {"name": "L", "visibility": "public"}, fan)
    feed_list = f"list:{body['list']['id']}"
    await api.call("PUT", f"/v1/lists/{body['list']['id']}/members/jane", None, fan)
    ws = await ws_connect()
    feeds = ["user:jane", feed_list, "event:derby-2026"]
    for f in feeds:
        await ws.subscribe(f)
    post = await api.post(jane, "soon gone", events=["derby-2026"])
    posted = {(await ws.recv())["feed"] for _ in feeds}
    assert posted == set(feeds)
    # Membership changes after the post do not change where its delete goes.
    await api.call("DELETE", f"/v1/lists/{body['list']['id']}/members/jane", None, fan)

    assert (await api.call("DELETE", f"/v1/posts/{post['id']}", None, jane))[0] == 204
    deletes = [await ws.recv() for _ in feeds]
    assert {d["feed"] for d in deletes} == set(feeds)
    assert all(d["op"] == "delete" and d["post_id"] == post["id"] and d["cursor"] for d in deletes)

    for f in feeds:
        status, hist = await api.call("GET", f"/v1/feeds/{f}/items")
        assert status == 200 and hist["items"] == [], (f, hist)
    assert (await api.call("GET", f"/v1/posts/{post['id']}"))[0] == 404
    assert (await api.call("DELETE", f"/v1/posts/{post['id']}", None, jane))[0] == 404


async def test_resume_after_a_delete_replays_the_delete(api: Api, ws_connect: Any) -> None:
    jane = await api.user("jane")
    ws = await ws_connect()
    await ws.subscribe("user:jane")
    keep = await api.post(jane, "keep")
    drop = await api.post(jane, "drop")
    frames = await ws.items(2)
    cursor = frames[0]["cursor"]  # after "keep"
    await ws.ws.close()
    assert (await api.call("DELETE", f"/v1/posts/{drop['id']}", None, ADMIN_TOKEN))[0] == 204
    probe = await ws_connect()
    await probe.subscribe("user:jane", cursor=frames[1]["cursor"])
    assert (await probe.recv())["op"] == "delete"  # fan-out of the delete is done

    ws2 = await ws_connect()
    await ws2.subscribe("user:jane", cursor=cursor)
    frame = await ws2.recv()
    assert frame["op"] == "delete" and frame["post_id"] == drop["id"]
    after = await api.post(jane, "after")
    assert (await ws2.recv())["post"]["id"] == after["id"]
    assert keep["id"] != drop["id"]


async def test_only_author_or_admin_deletes(api: Api) -> None:
    jane = await api.user("jane")
    bob = await api.user("bob")
    post = await api.post(jane, "mine")
    status, body = await api.call("DELETE", f"/v1/posts/{post['id']}", None, bob)
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert (await api.call("DELETE", f"/v1/posts/{post['id']}"))[0] == 401
    assert (await api.call("DELETE", f"/v1/posts/{post['id']}", None, ADMIN_TOKEN))[0] == 204
    assert (await api.call("DELETE", "/v1/posts/not-an-id", None, ADMIN_TOKEN))[0] == 404


async def test_get_post(api: Api) -> None:
    jane = await api.user("jane")
    post = await api.post(jane, "hello", events=["oaks"])
    assert await api.call("GET", f"/v1/posts/{post['id']}") == (200, {"post": post})
    assert (await api.call("GET", "/v1/posts/1-0"))[0] == 404
    assert (await api.call("GET", "/v1/posts/abc"))[0] == 404


async def test_history_pages_newest_first(api: Api, ws_connect: Any) -> None:
    jane = await api.user("jane")
    ws = await ws_connect()
    await ws.subscribe("user:jane")
    posts = [await api.post(jane, f"p{i}") for i in range(7)]
    await ws.items(7)
    await api.call("DELETE", f"/v1/posts/{posts[3]['id']}", None, jane)
    assert (await ws.recv())["op"] == "delete"

    seen: list[str] = []
    before = None
    pages = 0
    while True:
        path = "/v1/feeds/user:jane/items?limit=2" + (f"&before={before}" if before else "")
        status, body = await api.call("GET", path)
        assert status == 200
        pages += 1
        for item in body["items"]:
            assert item["op"] == "post" and item["feed"] == "user:jane" and item["cursor"]
            seen.append(item["post"]["id"])
        before = body["next"]
        if before is None:
            break
    expected = [p["id"] for p in reversed(posts) if p["id"] != posts[3]["id"]]
    assert seen == expected and pages == 3
    status, body = await api.call("GET", "/v1/feeds/user:jane/items")
    assert [i["post"]["id"] for i in body["items"]] == expected and body["next"] is None


async def test_history_errors(api: Api) -> None:
    for path, status in [
        ("/v1/feeds/user:jane/items?limit=0", 400),
        ("/v1/feeds/user:jane/items?limit=101", 400),
        ("/v1/feeds/user:jane/items?limit=x", 400),
        ("/v1/feeds/user:jane/items?before=nope", 400),
        ("/v1/feeds/planet:x/items", 400),
        ("/v1/feeds/list:missing/items", 404),
    ]:
        got, body = await api.call("GET", path)
        assert got == status, (path, body)
    assert await api.call("GET", "/v1/feeds/event:empty/items") == (200, {"items": [], "next": None})
