"""The OpenAPI document (`streamd/openapi.json`) against the real app.

- It is served at /v1/openapi.json and is a valid OpenAPI 3.1 document.
- It documents exactly the routes the app serves, in both directions.
- Every response it lists, (method, path, status), is produced by a concrete
  request in CASES, with the error code its description names and a body that
  matches its schema. A listed response without a case, or a case for a
  response that is not listed, fails: the document and the table stay in step.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp
import orjson
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from streamd.embedded import free_port
from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, TIMEOUT

DOC: dict[str, Any] = orjson.loads(resources.files("streamd").joinpath("openapi.json").read_bytes())
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")
# The protocol's code for each error status (PROTOCOL.md, streamd/errors.py).
PROTOCOL_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "bad_request",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
    503: "unavailable",
}
DOC_URI = "urn:streamd:openapi"
REGISTRY: Registry = Registry().with_resource(DOC_URI, Resource(contents=DOC, specification=DRAFT202012))
OVERSIZED = b'{"text": "' + b"x" * (17 * 1024) + b'"}'  # over the 16 KiB body limit

# The three servers the cases run against.
MAIN = "main"  # Redis up, default limits, fan-out worker
NO_REDIS = "no_redis"  # nothing listening at the Redis URL since the start
LIMITS = "limits"  # tiny limits, to reach 409 and 429


def pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(obj: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A response object and, for a `$ref`, the JSON pointer it names (siblings of `$ref` win)."""
    if "$ref" not in obj:
        return obj, None
    target = obj["$ref"].removeprefix("#")
    node: Any = DOC
    for part in target.strip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return {**node, **{k: v for k, v in obj.items() if k != "$ref"}}, target


def schema_validator(json_pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{DOC_URI}#{json_pointer}"}, registry=REGISTRY)


def documented_operations() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in DOC["paths"].items() for method in item if method in HTTP_METHODS}


def documented_responses() -> set[tuple[str, str, int]]:
    return {
        (method, path, int(status))
        for method, path in documented_operations()
        for status in DOC["paths"][path][method.lower()]["responses"]
    }


# --- requests -------------------------------------------------------------------------------

NOTHING = object()


@dataclass
class Reply:
    status: int
    content_type: str
    body: Any  # parsed JSON, raw bytes when not JSON, None when empty
    sent: Any = NOTHING  # the JSON body sent, if any


@dataclass
class Ctx:
    session: aiohttp.ClientSession
    base: str
    names: itertools.count = field(default_factory=lambda: itertools.count(1))
    tokens: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def fresh(self, prefix: str = "u") -> str:
        return f"{prefix}{next(self.names)}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = NOTHING,
        token: str | None = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is NOTHING else orjson.dumps(body))
        async with self.session.request(method, self.base + path, data=data, headers=hdrs) as resp:
            content = await resp.read()
            parsed: Any = None
            if content:
                parsed = orjson.loads(content) if resp.content_type == "application/json" else content
            return Reply(resp.status, resp.content_type, parsed, body)

    async def upgrade(self, query: str = "", token: str | None = None) -> Reply:
        """A well-formed WebSocket upgrade request, for the answers that refuse it."""
        key = base64.b64encode(os.urandom(16)).decode()
        headers = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": key,
            "Sec-WebSocket-Version": "13",
        }
        return await self.call("GET", "/v1/ws" + query, token=token, headers=headers)

    async def ok(self, method: str, path: str, body: Any = NOTHING, token: str | None = None, status: int = 201) -> Any:
        reply = await self.call(method, path, body, token)
        assert reply.status == status, (method, path, reply)
        return reply.body

    async def user(self) -> tuple[str, str]:
        handle = self.fresh()
        body = await self.ok("POST", "/v1/users", {"handle": handle}, ADMIN_TOKEN)
        return handle, body["token"]

    async def new_list(self, token: str, visibility: str = "public") -> str:
        body = await self.ok("POST", "/v1/lists", {"name": "a list", "visibility": visibility}, token)
        list_id: str = body["list"]["id"]
        return list_id

    async def new_post(self, token: str, **fields: Any) -> str:
        body = await self.ok("POST", "/v1/posts", {"text": "hello", **fields}, token)
        post_id: str = body["post"]["id"]
        return post_id


async def setup_main(c: Ctx) -> None:
    """alice owns a public and a private list and a post; bob is someone else."""
    for name in ("alice", "bob"):
        body = await c.ok("POST", "/v1/users", {"handle": name}, ADMIN_TOKEN)
        c.tokens[name] = body["token"]
    alice = c.tokens["alice"]
    c.ids["pub"] = await c.new_list(alice, "public")
    c.ids["priv"] = await c.new_list(alice, "private")
    c.ids["post"] = await c.new_post(alice)


# --- scenarios that take more than one request --------------------------------------------


async def ws_opens(c: Ctx) -> Reply:
    ws = await c.session.ws_connect(c.base + "/v1/ws")
    try:
        await ws.send_str('{"op": "ping", "ref": 1}')
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert orjson.loads(msg.data) == {"op": "pong", "ref": 1}, msg
    finally:
        await ws.close()
    return Reply(101, "", None)


async def ws_rate_limited(c: Ctx) -> Reply:
    # connections_burst=1: the first socket takes the only token of this address.
    ws = await c.session.ws_connect(c.base + "/v1/ws")
    await ws.close()
    return await c.upgrade()


async def revoke_own_token(c: Ctx) -> Reply:
    body = await c.ok("POST", "/v1/users/alice/tokens", token=c.tokens["alice"])
    return await c.call("DELETE", f"/v1/users/alice/tokens/{body['token_id']}", token=c.tokens["alice"])


async def delete_own_post(c: Ctx) -> Reply:
    post_id = await c.new_post(c.tokens["alice"])
    return await c.call("DELETE", f"/v1/posts/{post_id}", token=c.tokens["alice"])


async def patch_own_list(c: Ctx) -> Reply:
    list_id = await c.new_list(c.tokens["alice"])
    change = {"name": "renamed", "visibility": "private"}
    return await c.call("PATCH", f"/v1/lists/{list_id}", change, c.tokens["alice"])


async def delete_own_list(c: Ctx) -> Reply:
    list_id = await c.new_list(c.tokens["alice"])
    return await c.call("DELETE", f"/v1/lists/{list_id}", token=c.tokens["alice"])


async def embed_own_private_list(c: Ctx) -> Reply:
    body = {"feed": f"list:{c.ids['priv']}", "ttl_seconds": 9}
    return await c.call("POST", "/v1/embed-tokens", body, c.tokens["alice"])


async def feed_has_items(c: Ctx) -> Reply:
    """Waits for the fan-out (the post arriving on a socket), then reads the history."""
    slug = c.fresh("race-")
    ws = await c.session.ws_connect(c.base + "/v1/ws")
    try:
        await ws.send_str(orjson.dumps({"op": "subscribe", "feed": f"event:{slug}", "ref": 1}).decode())
        reply = orjson.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
        assert reply["op"] == "subscribed", reply
        media = [{"url": "https://example.com/a.png", "type": "image"}]
        await c.new_post(c.tokens["alice"], events=[slug], media=media)
        item = orjson.loads((await asyncio.wait_for(ws.receive(), TIMEOUT)).data)
        assert item["op"] == "post", item
    finally:
        await ws.close()
    reply = await c.call("GET", f"/v1/feeds/event:{slug}/items?limit=5")
    assert reply.status != 200 or len(reply.body["items"]) == 1, reply
    return reply


async def sse_opens(c: Ctx) -> Reply:
    """The stream never ends by itself: read the event of a new post, then leave."""
    async with c.session.get(c.base + "/v1/feeds/user:alice/events") as resp:
        if resp.status == 200:
            await c.new_post(c.tokens["alice"])
            line = await asyncio.wait_for(resp.content.readline(), TIMEOUT)
            assert line.startswith(b"id: "), line
        return Reply(resp.status, resp.content_type, None)


async def posts_rate_limited(c: Ctx) -> Reply:
    # posts_per_minute=1 counts per token and minute: a minute may turn between two posts.
    _, token = await c.user()
    reply = Reply(0, "", None)
    for _ in range(3):
        reply = await c.call("POST", "/v1/posts", {"text": "again"}, token)
        if reply.status != 201:
            break
    return reply


async def lists_full(c: Ctx) -> Reply:
    _, token = await c.user()
    await c.new_list(token)  # max_lists_per_user=1
    return await c.call("POST", "/v1/lists", {"name": "one more", "visibility": "public"}, token)


async def members_full(c: Ctx) -> Reply:
    owner, token = await c.user()
    other, _ = await c.user()
    list_id = await c.new_list(token)
    await c.ok("PUT", f"/v1/lists/{list_id}/members/{owner}", token=token, status=204)  # max_list_members=1
    return await c.call("PUT", f"/v1/lists/{list_id}/members/{other}", token=token)


async def not_modified(c: Ctx, path: str) -> Reply:
    """A conditional GET with the ETag of the copy just fetched."""
    async with c.session.get(c.base + path) as resp:
        assert resp.status == 200, resp
        etag = resp.headers["ETag"]
    return await c.call("GET", path, headers={"If-None-Match": etag})


# --- the table: every documented (method, path, status) and a request that produces it -----

Scenario = Callable[[Ctx], Awaitable[Reply]]


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    status: int
    run: Scenario
    server: str = MAIN


A = ADMIN_TOKEN
DEAD = "sdu_unknown-token"  # a user token: checking it needs Redis
USERS, USER, TOKENS = "/v1/users", "/v1/users/{handle}", "/v1/users/{handle}/tokens"
TOKEN = "/v1/users/{handle}/tokens/{token_id}"
OWNED, POSTS, POST = "/v1/users/{handle}/lists", "/v1/posts", "/v1/posts/{post_id}"
LISTS, LIST, MEMBER = "/v1/lists", "/v1/lists/{list_id}", "/v1/lists/{list_id}/members/{handle}"
ITEMS, EMBED = "/v1/feeds/{feed}/items", "/v1/embed-tokens"
EVENTS = "/v1/feeds/{feed}/events"
PUB, PRIV = "/v1/lists/{pub}", "/v1/lists/{priv}"
A_LIST = {"name": "Top", "visibility": "public"}
A_POST = {"text": "hi", "events": ["derby-2026"], "idempotency_key": "k"}
HTTP_MEDIA = {"text": "hi", "media": [{"url": "http://x.test/", "type": "image"}]}
BASIC = {"Authorization": "Basic eDp5"}


def t(c: Ctx, name: str) -> str:
    return c.tokens[name]


def p(c: Ctx, template: str) -> str:
    return template.format(**c.ids)


CASES: list[Case] = [
    Case("GET", "/healthz", 200, lambda c: c.call("GET", "/healthz")),
    Case("GET", "/readyz", 200, lambda c: c.call("GET", "/readyz")),
    Case("GET", "/readyz", 503, lambda c: c.call("GET", "/readyz"), NO_REDIS),
    Case("GET", "/metrics", 200, lambda c: c.call("GET", "/metrics")),
    Case("GET", "/v1/openapi.json", 200, lambda c: c.call("GET", "/v1/openapi.json")),
    # the WebSocket upgrade
    Case("GET", "/v1/ws", 101, ws_opens),
    Case("GET", "/v1/ws", 400, lambda c: c.call("GET", "/v1/ws")),  # not an upgrade
    Case("GET", "/v1/ws", 401, lambda c: c.upgrade(f"?token={DEAD}")),
    Case("GET", "/v1/ws", 429, ws_rate_limited, LIMITS),
    Case("GET", "/v1/ws", 503, lambda c: c.upgrade(token=DEAD), NO_REDIS),
    # users and tokens
    Case("POST", USERS, 201, lambda c: c.call("POST", USERS, {"handle": c.fresh(), "display_name": "Dee"}, A)),
    Case("POST", USERS, 400, lambda c: c.call("POST", USERS, {"handle": "Not A Handle"}, A)),
    Case("POST", USERS, 401, lambda c: c.call("POST", USERS, {"handle": "x"}, headers={"Authorization": A})),
    Case("POST", USERS, 403, lambda c: c.call("POST", USERS, {"handle": "x"}, t(c, "alice"))),
    Case("POST", USERS, 409, lambda c: c.call("POST", USERS, {"handle": "alice"}, A)),
    Case("POST", USERS, 413, lambda c: c.call("POST", USERS, token=A, raw=OVERSIZED)),
    Case("POST", USERS, 503, lambda c: c.call("POST", USERS, {"handle": "x"}, A), NO_REDIS),
    Case("GET", USER, 200, lambda c: c.call("GET", "/v1/users/alice")),
    Case("GET", USER, 401, lambda c: c.call("GET", "/v1/users/alice", headers=BASIC)),
    Case("GET", USER, 404, lambda c: c.call("GET", "/v1/users/nobody")),
    Case("GET", USER, 503, lambda c: c.call("GET", "/v1/users/alice"), NO_REDIS),
    Case("POST", TOKENS, 201, lambda c: c.call("POST", "/v1/users/alice/tokens", token=t(c, "alice"))),
    Case("POST", TOKENS, 401, lambda c: c.call("POST", "/v1/users/alice/tokens")),
    Case("POST", TOKENS, 403, lambda c: c.call("POST", "/v1/users/alice/tokens", token=t(c, "bob"))),
    Case("POST", TOKENS, 404, lambda c: c.call("POST", "/v1/users/nobody/tokens", token=A)),
    Case("POST", TOKENS, 503, lambda c: c.call("POST", "/v1/users/alice/tokens", token=DEAD), NO_REDIS),
    Case("DELETE", TOKEN, 204, revoke_own_token),
    Case("DELETE", TOKEN, 401, lambda c: c.call("DELETE", "/v1/users/alice/tokens/x", token=DEAD)),
    Case("DELETE", TOKEN, 403, lambda c: c.call("DELETE", "/v1/users/alice/tokens/x", token=t(c, "bob"))),
    Case("DELETE", TOKEN, 404, lambda c: c.call("DELETE", "/v1/users/alice/tokens/x", token=t(c, "alice"))),
    Case("DELETE", TOKEN, 503, lambda c: c.call("DELETE", "/v1/users/alice/tokens/x", token=A), NO_REDIS),
    Case("GET", OWNED, 200, lambda c: c.call("GET", "/v1/users/alice/lists", token=t(c, "alice"))),
    Case("GET", OWNED, 401, lambda c: c.call("GET", "/v1/users/alice/lists", token=DEAD)),
    Case("GET", OWNED, 404, lambda c: c.call("GET", "/v1/users/nobody/lists")),
    Case("GET", OWNED, 503, lambda c: c.call("GET", "/v1/users/alice/lists"), NO_REDIS),
    # posts
    Case("POST", POSTS, 201, lambda c: c.call("POST", POSTS, A_POST, t(c, "alice"))),
    Case("POST", POSTS, 400, lambda c: c.call("POST", POSTS, HTTP_MEDIA, t(c, "alice"))),
    Case("POST", POSTS, 401, lambda c: c.call("POST", POSTS, {"text": "hi"})),
    Case("POST", POSTS, 403, lambda c: c.call("POST", POSTS, {"text": "hi"}, A)),
    Case("POST", POSTS, 413, lambda c: c.call("POST", POSTS, token=t(c, "alice"), raw=OVERSIZED)),
    Case("POST", POSTS, 429, posts_rate_limited, LIMITS),
    Case("POST", POSTS, 503, lambda c: c.call("POST", POSTS, {"text": "hi"}, DEAD), NO_REDIS),
    Case("GET", POST, 200, lambda c: c.call("GET", p(c, "/v1/posts/{post}"))),
    Case("GET", POST, 401, lambda c: c.call("GET", p(c, "/v1/posts/{post}"), token=DEAD)),
    Case("GET", POST, 404, lambda c: c.call("GET", "/v1/posts/1-0")),
    Case("GET", POST, 503, lambda c: c.call("GET", "/v1/posts/1-0"), NO_REDIS),
    Case("DELETE", POST, 204, delete_own_post),
    Case("DELETE", POST, 401, lambda c: c.call("DELETE", p(c, "/v1/posts/{post}"))),
    Case("DELETE", POST, 403, lambda c: c.call("DELETE", p(c, "/v1/posts/{post}"), token=t(c, "bob"))),
    Case("DELETE", POST, 404, lambda c: c.call("DELETE", "/v1/posts/not-an-id", token=A)),
    Case("DELETE", POST, 503, lambda c: c.call("DELETE", "/v1/posts/1-0", token=A), NO_REDIS),
    # lists
    Case("POST", LISTS, 201, lambda c: c.call("POST", LISTS, {**A_LIST, "description": "d"}, t(c, "bob"))),
    Case("POST", LISTS, 400, lambda c: c.call("POST", LISTS, {"name": "Top"}, t(c, "bob"))),
    Case("POST", LISTS, 401, lambda c: c.call("POST", LISTS, A_LIST)),
    Case("POST", LISTS, 403, lambda c: c.call("POST", LISTS, A_LIST, A)),
    Case("POST", LISTS, 409, lists_full, LIMITS),
    Case("POST", LISTS, 413, lambda c: c.call("POST", LISTS, token=t(c, "bob"), raw=OVERSIZED)),
    Case("POST", LISTS, 503, lambda c: c.call("POST", LISTS, A_LIST, DEAD), NO_REDIS),
    Case("GET", LIST, 200, lambda c: c.call("GET", p(c, PUB))),
    Case("GET", LIST, 401, lambda c: c.call("GET", p(c, PUB), token=DEAD)),
    Case("GET", LIST, 404, lambda c: c.call("GET", p(c, PRIV), token=t(c, "bob"))),
    Case("GET", LIST, 503, lambda c: c.call("GET", "/v1/lists/abc"), NO_REDIS),
    Case("PATCH", LIST, 200, patch_own_list),
    Case("PATCH", LIST, 400, lambda c: c.call("PATCH", p(c, PUB), {}, t(c, "alice"))),
    Case("PATCH", LIST, 401, lambda c: c.call("PATCH", p(c, PUB), {"name": "mine"})),
    Case("PATCH", LIST, 403, lambda c: c.call("PATCH", p(c, PUB), {"name": "mine"}, t(c, "bob"))),
    Case("PATCH", LIST, 404, lambda c: c.call("PATCH", p(c, PRIV), {"name": "mine"}, t(c, "bob"))),
    Case("PATCH", LIST, 413, lambda c: c.call("PATCH", p(c, PUB), token=t(c, "alice"), raw=OVERSIZED)),
    Case("PATCH", LIST, 503, lambda c: c.call("PATCH", "/v1/lists/abc", {"name": "x"}, DEAD), NO_REDIS),
    Case("DELETE", LIST, 204, delete_own_list),
    Case("DELETE", LIST, 401, lambda c: c.call("DELETE", p(c, PUB))),
    Case("DELETE", LIST, 403, lambda c: c.call("DELETE", p(c, PUB), token=t(c, "bob"))),
    Case("DELETE", LIST, 404, lambda c: c.call("DELETE", "/v1/lists/no-such-list", token=A)),
    Case("DELETE", LIST, 503, lambda c: c.call("DELETE", "/v1/lists/abc", token=A), NO_REDIS),
    Case("PUT", MEMBER, 204, lambda c: c.call("PUT", p(c, PUB + "/members/bob"), token=t(c, "alice"))),
    Case("PUT", MEMBER, 400, lambda c: c.call("PUT", p(c, PUB + "/members/Bob"), token=t(c, "alice"))),
    Case("PUT", MEMBER, 401, lambda c: c.call("PUT", p(c, PUB + "/members/bob"))),
    Case("PUT", MEMBER, 403, lambda c: c.call("PUT", p(c, PUB + "/members/bob"), token=t(c, "bob"))),
    Case("PUT", MEMBER, 404, lambda c: c.call("PUT", p(c, PUB + "/members/nobody"), token=t(c, "alice"))),
    Case("PUT", MEMBER, 409, members_full, LIMITS),
    Case("PUT", MEMBER, 503, lambda c: c.call("PUT", "/v1/lists/abc/members/bob", token=A), NO_REDIS),
    Case("DELETE", MEMBER, 204, lambda c: c.call("DELETE", p(c, PRIV + "/members/nobody"), token=A)),
    Case("DELETE", MEMBER, 400, lambda c: c.call("DELETE", p(c, PUB + "/members/Bob"), token=t(c, "alice"))),
    Case("DELETE", MEMBER, 401, lambda c: c.call("DELETE", p(c, PUB + "/members/bob"))),
    Case("DELETE", MEMBER, 403, lambda c: c.call("DELETE", p(c, PUB + "/members/bob"), token=t(c, "bob"))),
    Case("DELETE", MEMBER, 404, lambda c: c.call("DELETE", p(c, PRIV + "/members/bob"))),
    Case("DELETE", MEMBER, 503, lambda c: c.call("DELETE", "/v1/lists/abc/members/bob", token=DEAD), NO_REDIS),
    # feeds and embed tokens
    Case("GET", ITEMS, 200, feed_has_items),
    Case("GET", ITEMS, 400, lambda c: c.call("GET", "/v1/feeds/user:alice/items?limit=101")),
    Case("GET", ITEMS, 401, lambda c: c.call("GET", "/v1/feeds/user:alice/items", headers=BASIC)),
    Case("GET", ITEMS, 404, lambda c: c.call("GET", p(c, "/v1/feeds/list:{priv}/items"))),
    Case("GET", ITEMS, 503, lambda c: c.call("GET", "/v1/feeds/user:alice/items"), NO_REDIS),
    Case("POST", EMBED, 201, embed_own_private_list),
    Case("POST", EMBED, 400, lambda c: c.call("POST", EMBED, {"feed": "user:alice", "ttl_seconds": 0}, t(c, "alice"))),
    Case("POST", EMBED, 401, lambda c: c.call("POST", EMBED, {"feed": "user:alice"})),
    Case("POST", EMBED, 403, lambda c: c.call("POST", EMBED, {"feed": "user:alice"}, t(c, "bob"))),
    Case("POST", EMBED, 404, lambda c: c.call("POST", EMBED, {"feed": p(c, "list:{priv}")}, t(c, "bob"))),
    Case("POST", EMBED, 413, lambda c: c.call("POST", EMBED, token=t(c, "alice"), raw=OVERSIZED)),
    Case("POST", EMBED, 503, lambda c: c.call("POST", EMBED, {"feed": "user:alice"}, DEAD), NO_REDIS),
    Case("GET", EVENTS, 200, sse_opens),
    Case("GET", EVENTS, 400, lambda c: c.call("GET", "/v1/feeds/user:alice/events", headers={"Last-Event-ID": "x"})),
    Case("GET", EVENTS, 401, lambda c: c.call("GET", "/v1/feeds/user:alice/events?token=" + DEAD)),
    Case("GET", EVENTS, 404, lambda c: c.call("GET", p(c, "/v1/feeds/list:{priv}/events"))),
    Case("GET", EVENTS, 503, lambda c: c.call("GET", "/v1/feeds/user:alice/events"), NO_REDIS),
    # the widget and its pages
    Case("GET", "/", 200, lambda c: c.call("GET", "/")),
    Case("GET", "/embed.js", 200, lambda c: c.call("GET", "/embed.js")),
    Case("GET", "/embed.js", 304, lambda c: not_modified(c, "/embed.js")),
    Case("GET", "/site.css", 200, lambda c: c.call("GET", "/site.css")),
    Case("GET", "/site.css", 304, lambda c: not_modified(c, "/site.css")),
    Case("GET", "/site.js", 200, lambda c: c.call("GET", "/site.js")),
    Case("GET", "/site.js", 304, lambda c: not_modified(c, "/site.js")),
    Case("GET", "/watch/{feed}", 200, lambda c: c.call("GET", p(c, "/watch/list:{pub}"))),
    Case("GET", "/watch/{feed}", 400, lambda c: c.call("GET", "/watch/nonsense")),
    Case("GET", "/watch/{feed}", 401, lambda c: c.call("GET", "/watch/user:alice?token=" + DEAD)),
    Case("GET", "/watch/{feed}", 404, lambda c: c.call("GET", p(c, "/watch/list:{priv}"))),
    Case("GET", "/watch/{feed}", 503, lambda c: c.call("GET", "/watch/user:alice"), NO_REDIS),
]


# --- the tests ------------------------------------------------------------------------------


async def test_document_is_served_and_is_openapi_3_1(server: Any, session: aiohttp.ClientSession) -> None:
    async with session.get(server.make_url("/v1/openapi.json")) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        served = orjson.loads(await resp.read())
    assert served == DOC
    assert isinstance(served["openapi"], str) and served["openapi"].startswith("3.1")
    validate_openapi(served)


async def test_every_served_route_is_documented_and_back(server: Any) -> None:
    served = {
        (route.method, route.resource.canonical)
        for route in server.app.router.routes()
        if route.method not in ("HEAD", "*") and route.resource is not None
    }
    documented = documented_operations()
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


def test_table_covers_exactly_the_documented_responses() -> None:
    table = [(c.method, c.path, c.status) for c in CASES]
    assert len(table) == len(set(table)), "a (method, path, status) is in the table twice"
    documented = documented_responses()
    assert documented - set(table) == set(), "documented responses with no request in CASES"
    assert set(table) - documented == set(), "CASES for responses the document does not list"


def test_error_descriptions_name_the_protocol_code() -> None:
    for method, path, status in sorted(documented_responses()):
        response, _ = resolve(DOC["paths"][path][method.lower()]["responses"][str(status)])
        if status in PROTOCOL_CODES:
            assert response["description"].startswith(PROTOCOL_CODES[status] + ": "), (method, path, status)
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def check(case: Case, reply: Reply) -> list[str]:
    """What is wrong with `reply` as the documented response of `case`."""
    operation = DOC["paths"][case.path][case.method.lower()]
    key = str(case.status)
    if reply.status != case.status:
        return [f"status {reply.status}, expected {case.status}: {reply.body!r}"]
    response, target = resolve(operation["responses"][key])
    problems = []
    content = response.get("content", {})
    if "application/json" in content:
        if reply.content_type != "application/json":
            return [f"content type {reply.content_type!r}, expected application/json: {reply.body!r}"]
        where = target or pointer("paths", case.path, case.method.lower(), "responses", key)
        schema_at = where + pointer("content", "application/json", "schema")
        errors = schema_validator(schema_at).iter_errors(reply.body)
        problems += [f"body {reply.body!r} breaks the schema: {e.message}" for e in errors]
        if case.status in PROTOCOL_CODES:
            code = response["description"].partition(":")[0]
            if not isinstance(reply.body, dict) or reply.body.get("error", {}).get("code") != code:
                problems.append(f"body {reply.body!r}, expected error code {code!r}")
    elif content:
        (media_type,) = content
        if reply.content_type != media_type:
            problems.append(f"content type {reply.content_type!r}, expected {media_type!r}")
    elif reply.body is not None:
        problems.append(f"a body {reply.body!r} where none is documented")
    # The documented request schema agrees with the handler on what is sent.
    if reply.sent is not NOTHING and "requestBody" in operation:
        request = pointer("paths", case.path, case.method.lower(), "requestBody")
        schema_at = request + pointer("content", "application/json", "schema")
        valid = schema_validator(schema_at).is_valid(reply.sent)
        if case.status < 300 and not valid:
            problems.append(f"the accepted body {reply.sent!r} breaks the documented request schema")
        if case.status == 400 and valid:
            problems.append(f"the refused body {reply.sent!r} passes the documented request schema")
    return problems


@pytest.mark.parametrize("variant", [MAIN, NO_REDIS, LIMITS])
async def test_every_documented_response_is_produced(
    variant: str, start_server: Callable[..., Any], settings: Settings, session: aiohttp.ClientSession
) -> None:
    if variant == MAIN:
        srv = await start_server(settings)
    elif variant == NO_REDIS:
        srv = await start_server(settings, with_worker=False, url=f"redis://127.0.0.1:{free_port()}/0")
    else:
        tiny = settings.replace(
            posts_per_minute=1,
            connections_per_second=0.001,
            connections_burst=1,
            max_lists_per_user=1,
            max_list_members=1,
        )
        srv = await start_server(tiny, with_worker=False)
    ctx = Ctx(session, str(srv.make_url("")).rstrip("/"))
    if variant == MAIN:
        await setup_main(ctx)
    cases = [c for c in CASES if c.server == variant]
    assert cases
    failures = []
    for case in cases:
        reply = await asyncio.wait_for(case.run(ctx), 3 * TIMEOUT)
        failures += [f"{case.method} {case.path} {case.status}: {problem}" for problem in check(case, reply)]
    assert not failures, "\n".join(failures)
