"""The backend publisher: posts straight through Redis, kept and delivered like HTTP posts."""

from __future__ import annotations

from typing import Any

import pytest

from streamd import store
from streamd.errors import BadRequest, NotFound
from streamd.publisher import Publisher
from streamd.settings import Settings
from tests.helpers import Api
from tests.test_lists_e2e import make_list


@pytest.fixture(params=["auto-pipelined", "redis-py"])
async def publisher(request: pytest.FixtureRequest, redis_url: str, settings: Settings) -> Any:
    if request.param == "auto-pipelined":
        async with Publisher.open(redis_url, settings) as pub:
            yield pub
    else:
        # No auto-pipeline: the path Cluster and wait_replicas take.
        client = store.connect(redis_url, settings)
        try:
            yield Publisher(client, settings)
        finally:
            await store.close(client)


async def test_a_published_post_reaches_the_author_list_and_event_feeds_once(
    api: Api, ws_connect: Any, publisher: Publisher
) -> None:
    fan = await api.user("fan")
    await api.user("jane")
    lst = await make_list(api, fan)
    await api.call("PUT", f"/v1/lists/{lst['id']}/members/jane", None, fan)
    ws = await ws_connect()
    feeds = {"user:jane", f"list:{lst['id']}", "event:derby-2026"}
    for feed in sorted(feeds):
        await ws.subscribe(feed)

    post, created = await publisher.post("jane", {"text": "Gate 4", "events": ["derby-2026"]})
    assert created and post["author"] == "jane" and post["text"] == "Gate 4" and post["events"] == ["derby-2026"]
    got = {}
    for _ in range(3):
        frame = await ws.recv()
        assert frame["op"] == "post" and frame["post"] == post, frame
        got[frame["feed"]] = frame["post"]["id"]
    assert set(got) == feeds

    # Kept like an HTTP post: in the history, and readable by id.
    status, body = await api.call("GET", "/v1/feeds/user:jane/items")
    assert status == 200 and [i["post"]["id"] for i in body["items"]] == [post["id"]]
    status, body = await api.call("GET", f"/v1/posts/{post['id']}")
    assert status == 200 and body["post"] == post


async def test_an_idempotent_repeat_answers_with_the_first_post_and_is_not_delivered_again(
    api: Api, ws_connect: Any, publisher: Publisher
) -> None:
    await api.user("jane")
    ws = await ws_connect()
    await ws.subscribe("user:jane")
    first, created = await publisher.post("jane", {"text": "Result", "idempotency_key": "r1"})
    assert created
    again, created = await publisher.post("jane", {"text": "Result", "idempotency_key": "r1"})
    assert not created and again == first
    marker, _ = await publisher.post("jane", {"text": "marker"})
    frames = await ws.items(2)
    assert [f["post"]["id"] for f in frames] == [first["id"], marker["id"]]


async def test_bad_posts_and_unknown_authors_are_refused_with_the_http_errors(
    api: Api, publisher: Publisher
) -> None:
    await api.user("jane")
    with pytest.raises(NotFound):
        await publisher.post("nobody", {"text": "hello"})
    with pytest.raises(NotFound):
        await publisher.post("Not A Handle", {"text": "hello"})
    status, http_body = await api.call("POST", "/v1/posts", {"text": ""}, await api.user("bob"))
    with pytest.raises(BadRequest) as refused:
        await publisher.post("jane", {"text": ""})
    assert status == 400 and refused.value.body() == http_body
    with pytest.raises(BadRequest):
        await publisher.post("jane", {"text": "x", "colour": "red"})
    # Nothing of the refused posts was kept.
    status, body = await api.call("GET", "/v1/feeds/user:jane/items")
    assert status == 200 and body["items"] == []



async def test_posts_follow_the_lists_the_author_is_in_when_each_is_accepted(
    api: Api, ws_connect: Any, publisher: Publisher
) -> None:
    # On one server the publisher remembers an author's lists and the accepting
    # script checks them: a membership changed since the last post must win.
    fan = await api.user("fan")
    await api.user("jane")
    jockeys = await make_list(api, fan, name="Jockeys")
    trainers = await make_list(api, fan, name="Trainers")
    await api.call("PUT", f"/v1/lists/{jockeys['id']}/members/jane", None, fan)
    ws = await ws_connect()
    for feed in ("user:jane", f"list:{jockeys['id']}", f"list:{trainers['id']}"):
        await ws.subscribe(feed)
    markers: set[str] = set()

    async def delivered(text: str) -> list[str]:
        """The list feeds a post by jane reached: its frames come before the
        next post's frame in her own feed (one socket, publish order)."""
        post, _ = await publisher.post("jane", {"text": text})
        marker, _ = await publisher.post("jane", {"text": f"after {text}"})
        markers.add(marker["id"])
        feeds = []
        while True:
            frame = await ws.recv()
            assert frame["op"] == "post", frame
            if frame["post"]["id"] == marker["id"] and frame["feed"] == "user:jane":
                return feeds
            if frame["post"]["id"] in markers:
                continue  # the previous marker in the lists it reached
            assert frame["post"]["id"] == post["id"], frame
            if frame["feed"] != "user:jane":
                feeds.append(frame["feed"])

    assert await delivered("one list") == [f"list:{jockeys['id']}"]
    # Moved: out of one list, into the other, between two posts.
    await api.call("DELETE", f"/v1/lists/{jockeys['id']}/members/jane", None, fan)
    await api.call("PUT", f"/v1/lists/{trainers['id']}/members/jane", None, fan)
    assert await delivered("moved") == [f"list:{trainers['id']}"]
    await api.call("PUT", f"/v1/lists/{jockeys['id']}/members/jane", None, fan)
    assert sorted(await delivered("both")) == sorted(f"list:{lst['id']}" for lst in (jockeys, trainers))
    await api.call("DELETE", f"/v1/lists/{jockeys['id']}/members/jane", None, fan)
    await api.call("DELETE", f"/v1/lists/{trainers['id']}/members/jane", None, fan)
    assert await delivered("none") == []
