"""The HTTP API over a real socket: users, tokens, posts, errors, health."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.helpers import ADMIN_TOKEN, Api


async def test_create_user_and_get(api: Api) -> None:
    status, body = await api.call("POST", "/v1/users", {"handle": "alice", "display_name": "Alice A."}, ADMIN_TOKEN)
    assert status == 201
    assert body["user"]["handle"] == "alice" and body["user"]["display_name"] == "Alice A."
    assert body["token"].startswith("sdu_") and body["token_id"]
    status, body = await api.call("GET", "/v1/users/alice")
    assert status == 200 and body["user"]["display_name"] == "Alice A."


async def test_tokens_are_stored_only_as_hashes(api: Api, redis: Any) -> None:
    token = await api.user("bob")
    dump = b"".join([k for k in await redis.keys("*")])
    values = [await redis.get(k) for k in await redis.keys("*:token")]
    assert token.encode() not in dump and all(token.encode() not in v for v in values)


@pytest.mark.parametrize(
    "body, token, status, code",
    [
        ({"handle": "x"}, None, 401, "unauthorized"),
        ({"handle": "x"}, "wrong", 401, "unauthorized"),
        ({"handle": "Bad Handle"}, ADMIN_TOKEN, 400, "bad_request"),
        ({"handle": "x" * 33}, ADMIN_TOKEN, 400, "bad_request"),
        ({"handle": "x", "display_name": ""}, ADMIN_TOKEN, 400, "bad_request"),
        ({"handle": "x", "role": "admin"}, ADMIN_TOKEN, 400, "bad_request"),
        (["x"], ADMIN_TOKEN, 400, "bad_request"),
    ],
)
async def test_create_user_errors(api: Api, body: Any, token: str | None, status: int, code: str) -> None:
    got, reply = await api.call("POST", "/v1/users", body, token)
    assert (got, reply["error"]["code"]) == (status, code)
    assert reply["error"]["message"]


async def test_duplicate_handle_conflicts(api: Api) -> None:
    await api.user("carol")
    status, body = await api.call("POST", "/v1/users", {"handle": "carol"}, ADMIN_TOKEN)
    assert status == 409 and body["error"]["code"] == "conflict"


async def test_user_token_cannot_create_users(api: Api) -> None:
    token = await api.user("dave")
    status, body = await api.call("POST", "/v1/users", {"handle": "eve"}, token)
    assert status == 403 and body["error"]["code"] == "forbidden"


async def test_issue_and_revoke_tokens(api: Api) -> None:
    token = await api.user("fay")
    status, body = await api.call("POST", "/v1/users/fay/tokens", None, token)
    assert status == 201
    second, second_id = body["token"], body["token_id"]
    assert (await api.call("POST", "/v1/posts", {"text": "with the second"}, second))[0] == 201
    assert (await api.call("DELETE", f"/v1/users/fay/tokens/{second_id}", None, token))[0] == 204
    status, body = await api.call("POST", "/v1/posts", {"text": "revoked"}, second)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await api.call("DELETE", f"/v1/users/fay/tokens/{second_id}", None, token)
    assert status == 404
    other = await api.user("gus")
    status, body = await api.call("POST", "/v1/users/fay/tokens", None, other)
    assert status == 403
    status, body = await api.call("POST", "/v1/users/fay/tokens", None, ADMIN_TOKEN)
    assert status == 201


async def test_unknown_user(api: Api) -> None:
    status, body = await api.call("GET", "/v1/users/nobody")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.call("POST", "/v1/users/nobody/tokens", None, ADMIN_TOKEN)
    assert status == 404


async def test_post_is_created(api: Api) -> None:
    token = await api.user("hal")
    status, body = await api.call(
        "POST",
        "/v1/posts",
        {"text": "Race 3: scratch #7", "events": ["race-3"], "media": [{"url": "https://x.example/a.png", "type": "image"}]},
        token,
    )
    assert status == 201
    post = body["post"]
    assert set(post) == {"id", "author", "text", "events", "media", "created_at"}
    assert post["author"] == "hal" and post["events"] == ["race-3"]


async def test_post_ids_are_unique_and_time_ordered(api: Api) -> None:
    token = await api.user("ida")
    posts = await asyncio.gather(*(api.post(token, f"p{i}") for i in range(30)))
    ids = [tuple(map(int, p["id"].split("-"))) for p in posts]
    assert len(set(ids)) == 30
    by_id = sorted(posts, key=lambda p: tuple(map(int, p["id"].split("-"))))
    assert [p["created_at"] for p in by_id] == sorted(p["created_at"] for p in posts)


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (b"", 400, "bad_request"),
        (b"{nope", 400, "bad_request"),
        (b'{"text": 1}', 400, "bad_request"),
        (b'{"text": "x", "author": "someone_else"}', 400, "bad_request"),
        (b'{"text": "x", "events": ["Bad Slug"]}', 400, "bad_request"),
        (b'{"text": "' + b"x" * 1001 + b'"}', 400, "bad_request"),
        (b'{"text": "' + b"x" * 17000 + b'"}', 413, "payload_too_large"),
    ],
)
async def test_bad_posts(api: Api, raw: bytes, status: int, code: str) -> None:
    token = await api.user("jo")
    got, body = await api.call("POST", "/v1/posts", token=token, raw=raw)
    assert (got, body["error"]["code"]) == (status, code)


async def test_posting_needs_a_user_token(api: Api) -> None:
    status, body = await api.call("POST", "/v1/posts", {"text": "x"})
    assert status == 401
    status, body = await api.call("POST", "/v1/posts", {"text": "x"}, ADMIN_TOKEN)
    assert status == 403
    async with api.session.post(api.base + "/v1/posts", json={"text": "x"}, headers={"Authorization": "Basic abc"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"


async def test_idempotency_key_returns_first_post_and_fans_out_once(api: Api, ws_connect: Any) -> None:
    token = await api.user("kim")
    ws = await ws_connect()
    await ws.subscribe("user:kim")
    replies = await asyncio.gather(
        *(api.call("POST", "/v1/posts", {"text": f"try {i}", "idempotency_key": "once"}, token) for i in range(10))
    )
    assert {status for status, _ in replies} == {201}
    posts = {body["post"]["id"]: body["post"] for _, body in replies}
    assert len(posts) == 1
    (first,) = posts.values()
    frame = await ws.recv()
    assert frame["post"] == first
    marker = await api.post(token, "marker")
    assert (await ws.recv())["post"]["id"] == marker["id"]
    # Another author may use the same key.
    other = await api.user("lee")
    status, body = await api.call("POST", "/v1/posts", {"text": "mine", "idempotency_key": "once"}, other)
    assert status == 201 and body["post"]["author"] == "lee"


async def test_unknown_route_and_method(api: Api) -> None:
    status, body = await api.call("GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.call("PUT", "/v1/posts", {"text": "x"})
    assert status == 405 and body["error"]["code"] == "bad_request"


async def test_health(api: Api) -> None:
    assert await api.call("GET", "/healthz") == (200, {"status": "ok"})
    assert await api.call("GET", "/readyz") == (200, {"status": "ready"})


async def test_readyz_is_503_without_redis(start_server: Any, settings: Any, session: aiohttp.ClientSession) -> None:
    from streamd.embedded import free_port

    srv = await start_server(settings, with_worker=False, url=f"redis://127.0.0.1:{free_port()}/0")
    async with session.get(srv.make_url("/readyz")) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "unavailable"
    async with session.get(srv.make_url("/healthz")) as resp:
        assert resp.status == 200


async def test_ws_upgrade_with_bad_token_is_401(server: Any, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await session.ws_connect(server.make_url("/v1/ws?token=sdu_bad"))
    assert info.value.status == 401
