"""Curated lists and event feeds end to end: members' posts reach the list live."""

from __future__ import annotations

from typing import Any

import pytest

from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, Api


@pytest.fixture(params=[True, False], ids=["fanout-at-accept", "worker-writes"])
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Every case with the accepting script fanning posts out, and with the worker doing it."""
    return settings.replace(fanout_at_accept=request.param)


async def make_list(api: Api, token: str, **fields: Any) -> dict[str, Any]:
    body = {"name": "Top handicappers", "visibility": "public", **fields}
    status, reply = await api.call("POST", "/v1/lists", body, token)
    assert status == 201, reply
    lst: dict[str, Any] = reply["list"]
    return lst


async def test_list_crud(api: Api) -> None:
    fan = await api.user("fan")
    await api.user("jockey_jane")
    lst = await make_list(api, fan, description="who to read on race day")
    assert lst["owner"] == "fan" and lst["members"] == [] and lst["visibility"] == "public"
    assert lst["description"] == "who to read on race day"
    lid = lst["id"]
    assert (await api.call("PUT", f"/v1/lists/{lid}/members/jockey_jane", None, fan))[0] == 204
    assert (await api.call("PUT", f"/v1/lists/{lid}/members/jockey_jane", None, fan))[0] == 204  # idempotent
    status, body = await api.call("GET", f"/v1/lists/{lid}")
    assert status == 200 and body["list"]["members"] == ["jockey_jane"]
    status, body = await api.call("PATCH", f"/v1/lists/{lid}", {"name": "Race day", "visibility": "private"}, fan)
    assert status == 200 and body["list"]["name"] == "Race day" and body["list"]["visibility"] == "private"
    assert body["list"]["description"] == "who to read on race day"
    assert (await api.call("GET", f"/v1/lists/{lid}"))[0] == 404  # private: hidden from the anonymous
    assert (await api.call("GET", f"/v1/lists/{lid}", token=fan))[0] == 200
    status, body = await api.call("GET", "/v1/users/fan/lists", token=fan)
    assert [x["id"] for x in body["lists"]] == [lid]
    status, body = await api.call("GET", "/v1/users/fan/lists")
    assert status == 200 and body["lists"] == []
    assert (await api.call("DELETE", f"/v1/lists/{lid}/members/jockey_jane", None, fan))[0] == 204
    assert (await api.call("DELETE", f"/v1/lists/{lid}/members/jockey_jane", None, fan))[0] == 204
    assert (await api.call("DELETE", f"/v1/lists/{lid}", None, fan))[0] == 204
    assert (await api.call("GET", f"/v1/lists/{lid}", token=fan))[0] == 404
    assert (await api.call("GET", "/v1/users/fan/lists", token=fan))[1]["lists"] == []


async def test_member_post_reaches_list_and_events_once(api: Api, ws_connect: Any) -> None:
    fan = await api.user("fan")
    jane = await api.user("jane")
    bob = await api.user("bob")
    lst = await make_list(api, fan)
    feed = f"list:{lst['id']}"
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    ws = await ws_connect()
    for f in (feed, "event:derby-2026", "event:oaks-2026"):
        await ws.subscribe(f)

    await api.post(bob, "not a member, no event")
    post = await api.post(jane, "Gate 4", events=["derby-2026", "oaks-2026"])
    got = {}
    for _ in range(3):
        frame = await ws.recv()
        assert frame["post"]["id"] == post["id"]
        got[frame["feed"]] = frame["post"]
    assert set(got) == {feed, "event:derby-2026", "event:oaks-2026"}
    marker = await api.post(jane, "marker")  # only in the list feed
    frame = await ws.recv()
    assert (frame["feed"], frame["post"]["id"]) == (feed, marker["id"])


async def test_membership_changes_apply_to_the_next_post(api: Api, ws_connect: Any) -> None:
    fan = await api.user("fan")
    jane = await api.user("jane")
    lst = await make_list(api, fan)
    feed = f"list:{lst['id']}"
    ws = await ws_connect()
    await ws.subscribe(feed)
    await ws.subscribe("user:jane")

    before = await api.post(jane, "before joining")
    assert (await ws.recv())["feed"] == "user:jane"
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    joined = await api.post(jane, "after joining")
    frames = {(f["feed"], f["post"]["id"]) for f in [await ws.recv(), await ws.recv()]}
    assert frames == {("user:jane", joined["id"]), (feed, joined["id"])}
    await api.call("DELETE", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    left = await api.post(jane, "after leaving")
    frame = await ws.recv()
    assert (frame["feed"], frame["post"]["id"]) == ("user:jane", left["id"])
    # A post already fanned out stays where it went.
    status, body = await api.call("GET", f"/v1/feeds/{feed}/items")
    assert [i["post"]["id"] for i in body["items"]] == [joined["id"]]
    assert before["id"] not in [i["post"]["id"] for i in body["items"]]


async def test_private_list_feed_for_owner_admin_and_embed_token(api: Api, ws_connect: Any) -> None:
    fan = await api.user("fan")
    jane = await api.user("jane")
    lst = await make_list(api, fan, visibility="private")
    feed = f"list:{lst['id']}"
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    status, body = await api.call("POST", "/v1/embed-tokens", {"feed": feed, "ttl_seconds": 600}, fan)
    assert status == 201
    embed = body["token"]

    anon = await ws_connect()
    reply = await anon.request("subscribe", feed=feed)
    assert reply["op"] == "error" and reply["code"] == "not_found" and reply["feed"] == feed
    readers = []
    for token in (fan, ADMIN_TOKEN, embed):
        ws = await ws_connect()
        assert (await ws.request("auth", token=token))["op"] == "ok"
        await ws.subscribe(feed)
        readers.append(ws)
    post = await api.post(jane, "for the list")
    for ws in readers:
        assert (await ws.recv())["post"]["id"] == post["id"]
    # The embed token reads over HTTP too, and only that feed.
    assert (await api.call("GET", f"/v1/feeds/{feed}/items", token=embed))[0] == 200
    assert (await api.call("GET", f"/v1/feeds/{feed}/items"))[0] == 404
    # ... and cannot write.
    assert (await api.call("POST", "/v1/posts", {"text": "x"}, embed))[0] == 403


async def test_deleting_a_list_tells_its_subscribers(api: Api, ws_connect: Any) -> None:
    fan = await api.user("fan")
    jane = await api.user("jane")
    lst = await make_list(api, fan)
    feed = f"list:{lst['id']}"
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    ws = await ws_connect()
    await ws.subscribe(feed)
    await ws.subscribe("user:jane")
    assert (await api.call("DELETE", f"/v1/lists/{lst['id']}", None, fan))[0] == 204
    frame = await ws.recv()
    assert frame["op"] == "error" and frame["code"] == "not_found" and frame["feed"] == feed
    post = await api.post(jane, "after the list is gone")
    frame = await ws.recv()
    assert (frame["feed"], frame["post"]["id"]) == ("user:jane", post["id"])
    reply = await ws.request("subscribe", feed=feed)
    assert reply["code"] == "not_found"


async def test_making_a_list_private_evicts_other_readers(api: Api, ws_connect: Any) -> None:
    fan = await api.user("fan")
    lst = await make_list(api, fan)
    feed = f"list:{lst['id']}"
    stranger = await ws_connect()
    await stranger.subscribe(feed)
    owner = await ws_connect()
    await owner.request("auth", token=fan)
    await owner.subscribe(feed)
    await api.call("PATCH", f"/v1/lists/{lst['id']}", {"visibility": "private"}, fan)
    frame = await stranger.recv()
    assert frame["op"] == "error" and frame["code"] == "not_found" and frame["feed"] == feed
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/fan", None, fan)
    post = await api.post(fan, "still here")
    frame = await owner.recv()  # the owner still reads it
    assert (frame["feed"], frame["post"]["id"]) == (feed, post["id"])
    await stranger.subscribe("user:fan")  # the stranger was unsubscribed from the list only
    again = await api.post(fan, "again")
    frame = await stranger.recv()
    assert (frame["feed"], frame["post"]["id"]) == ("user:fan", again["id"])


async def test_list_input_errors(api: Api) -> None:
    fan = await api.user("fan")
    lst = await make_list(api, fan)
    lid = lst["id"]
    cases = [
        ("POST", "/v1/lists", {"visibility": "public"}, 400),
        ("POST", "/v1/lists", {"name": "", "visibility": "public"}, 400),
        ("POST", "/v1/lists", {"name": "x" * 101, "visibility": "public"}, 400),
        ("POST", "/v1/lists", {"name": "x", "visibility": "secret"}, 400),
        ("POST", "/v1/lists", {"name": "x", "visibility": "public", "members": []}, 400),
        ("POST", "/v1/lists", {"name": "x", "description": 5, "visibility": "public"}, 400),
        ("PATCH", f"/v1/lists/{lid}", {}, 400),
        ("PATCH", f"/v1/lists/{lid}", {"owner": "me"}, 400),
        ("PUT", f"/v1/lists/{lid}/members/Not-A-Handle", None, 400),
        ("PUT", f"/v1/lists/{lid}/members/ghost", None, 404),
        ("GET", "/v1/lists/no_such_list", None, 404),
        ("GET", "/v1/users/ghost/lists", None, 404),
    ]
    for method, path, body, status in cases:
        got, reply = await api.call(method, path, body, fan)
        assert got == status, (method, path, body, reply)
        assert reply["error"]["message"]


async def test_list_member_limit(start_server: Any, settings: Any, session: Any) -> None:
    srv = await start_server(settings.replace(max_list_members=2, max_lists_per_user=1))
    api = Api(session, str(srv.make_url("")).rstrip("/"))
    fan = await api.user("fan")
    for h in ("a", "b", "c"):
        await api.user(h)
    lst = await make_list(api, fan)
    for h in ("a", "b"):
        assert (await api.call("PUT", f"/v1/lists/{lst['id']}/members/{h}", None, fan))[0] == 204
    status, body = await api.call("PUT", f"/v1/lists/{lst['id']}/members/c", None, fan)
    assert status == 409 and body["error"]["code"] == "conflict"
    status, body = await api.call("POST", "/v1/lists", {"name": "second", "visibility": "public"}, fan)
    assert status == 409
