"""Authorization matrix: every HTTP route and every socket op, as every kind of caller.

The callers:

    anon         no token
    other        a user who owns nothing here ("other")
    owner        the user who owns the lists and the post ("owner")
    admin        the admin token
    embed        an embed token for the feed the row is about
    embed_other  an embed token for another feed (issued by the same owner, so
                 only its feed, not its issuer, can tell it apart)
    revoked      a token of "owner" revoked with DELETE /v1/users/owner/tokens/{id}

Each test gets a flushed Redis and a fresh app, and the `sc` fixture builds the
same scenario: users "owner" and "other", a public and a private list owned by
"owner" (both with "owner" as a member), one post by "owner" tagged
`event:derby` that has reached every feed, embed tokens for `user:owner`,
`event:derby`, `list:<public>` and `list:<private>`, a spare token of "owner"
and the revoked one.

The expectations follow PROTOCOL.md (the "who" column of the HTTP table and the
visibility rules). Where the protocol leaves the order of checks open, the
tables use these rules, written down so that they can be argued with:

- a revoked or unknown token is 401 everywhere, also where anyone may call;
- a private list that the caller may not read is answered exactly like a list
  that does not exist (404 `not_found`), on every list route, for anonymous
  callers too (`test_private_list_answers_like_a_missing_list` checks the
  "exactly like" part);
- embed tokens are read-only: a write with one is 403, whatever list it names
  (decided by the kind of token before anything is looked up, as
  POST /v1/embed-tokens does, so nothing leaks);
- an embed token reads its feed (HTTP items, socket), not the list record:
  GET /v1/lists/{id} and GET /v1/users/{handle}/lists show a private list to
  its owner and admin only (the "who" column);
- admin is not a user: routes whose "who" is "user" (POST /v1/posts,
  POST /v1/lists) answer 403 to the admin token, since the author or owner is
  always the token's user.

Cases where the code disagrees with the protocol are marked
`xfail(strict=True)` with the discrepancy as the reason; they keep asserting
what the protocol says.

The app runs without its background fan-out worker (whose blocking read makes
every app shutdown take half a second); the scenario drives the real
`FanoutWorker` itself, once, so that its post is in every feed before a test
starts. Nothing here depends on a later fan-out.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from streamd import keys
from streamd.auth import sign_embed_token
from streamd.fanout import FanoutWorker
from tests.helpers import ADMIN_TOKEN, Api, WsClient

ANON, OTHER, OWNER, ADMIN, EMBED, EMBED_OTHER, REVOKED = (
    "anon",
    "other",
    "owner",
    "admin",
    "embed",
    "embed_other",
    "revoked",
)
CALLERS = (ANON, OTHER, OWNER, ADMIN, EMBED, EMBED_OTHER, REVOKED)

# The feeds of the scenario, by key; embed tokens exist for each of them.
USER_FEED, EVENT_FEED, PUB, PRIV = "user", "event", "pub", "priv"
# For a row about feed X, `embed_other` is the embed token of OTHER_FEED[X].
OTHER_FEED = {USER_FEED: PRIV, EVENT_FEED: PRIV, PUB: PRIV, PRIV: PUB}

MISSING_LIST = "nosuchlist42"
ERROR_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict"}


@pytest.fixture
async def server(start_server: Callable[..., Any], settings: Any) -> Any:
    """The real app, without the background worker (see the module docstring)."""
    return await start_server(settings, with_worker=False)


# -- the scenario ---------------------------------------------------------------


@dataclass
class Scenario:
    api: Api
    tokens: dict[str, str | None]  # caller -> token, for anon/other/owner/admin/revoked
    owner_token_id: str
    spare: str  # another token of "owner", target of the revoke rows
    spare_id: str
    pub: str
    priv: str
    post: dict[str, Any]
    embeds: dict[str, str] = field(default_factory=dict)  # feed key -> embed token
    embed_secret: bytes = b""  # the app's signing secret, kept in Redis

    def feed(self, key: str) -> str:
        names = {USER_FEED: "user:owner", EVENT_FEED: "event:derby", PUB: f"list:{self.pub}", PRIV: f"list:{self.priv}"}
        return names[key]

    def token(self, caller: str, feed_key: str) -> str | None:
        if caller == EMBED:
            return self.embeds[feed_key]
        if caller == EMBED_OTHER:
            return self.embeds[OTHER_FEED[feed_key]]
        return self.tokens[caller]

    def expired_embed(self, feed_key: str) -> str:
        """A well-signed embed token for the feed whose expiry has passed."""
        return sign_embed_token(self.embed_secret, self.feed(feed_key), "owner", int(time.time()) - 1)

    def user_token(self, caller: str) -> str:
        token = self.tokens[caller]
        assert token is not None
        return token

    def fill(self, template: Any) -> Any:
        """Put the scenario's ids into a path or a body."""
        if isinstance(template, str):
            return template.format(pub=self.pub, priv=self.priv, post_id=self.post["id"], spare_id=self.spare_id)
        if isinstance(template, dict):
            return {k: self.fill(v) for k, v in template.items()}
        return template

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        return await self.api.call(method, self.fill(path), self.fill(body), token)

    async def as_admin(self, method: str, path: str) -> tuple[int, Any]:
        return await self.call(method, path, None, ADMIN_TOKEN)


async def _expect(api: Api, status: int, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    got, reply = await api.call(method, path, body, token)
    assert got == status, (method, path, got, reply)
    return reply


async def fan_out(redis: Any, settings: Any) -> None:
    """Run the real fan-out worker over everything accepted so far."""
    worker = FanoutWorker(redis, settings, consumer="authz-matrix")
    await worker.ensure_group()
    while await worker.step():
        pass


@pytest.fixture
async def sc(api: Api, redis: Any, settings: Any) -> Scenario:
    owner = await _expect(api, 201, "POST", "/v1/users", {"handle": "owner"}, ADMIN_TOKEN)
    other = await _expect(api, 201, "POST", "/v1/users", {"handle": "other"}, ADMIN_TOKEN)
    owner_token = owner["token"]
    doomed = await _expect(api, 201, "POST", "/v1/users/owner/tokens", None, owner_token)
    await _expect(api, 204, "DELETE", f"/v1/users/owner/tokens/{doomed['token_id']}", None, owner_token)
    spare = await _expect(api, 201, "POST", "/v1/users/owner/tokens", None, owner_token)
    lists = {}
    for visibility in ("public", "private"):
        body = {"name": f"{visibility} picks", "visibility": visibility}
        lists[visibility] = (await _expect(api, 201, "POST", "/v1/lists", body, owner_token))["list"]["id"]
        await _expect(api, 204, "PUT", f"/v1/lists/{lists[visibility]}/members/owner", None, owner_token)
    post = await api.post(owner_token, "the scenario post", events=["derby"])
    await fan_out(redis, settings)

    s = Scenario(
        api=api,
        tokens={ANON: None, OTHER: other["token"], OWNER: owner_token, ADMIN: ADMIN_TOKEN, REVOKED: doomed["token"]},
        owner_token_id=owner["token_id"],
        spare=spare["token"],
        spare_id=spare["token_id"],
        pub=lists["public"],
        priv=lists["private"],
        post=post,
    )
    for key in (USER_FEED, EVENT_FEED, PUB, PRIV):
        issuer = ADMIN_TOKEN if key == EVENT_FEED else owner_token  # nobody owns an event
        reply = await _expect(api, 201, "POST", "/v1/embed-tokens", {"feed": s.feed(key), "ttl_seconds": 600}, issuer)
        s.embeds[key] = reply["token"]
    # The signing secret: configured, else made in Redis when the first embed token was issued.
    secret = settings.embed_secret.encode() if settings.embed_secret else await redis.get(keys.EMBED_SECRET)
    assert secret, "no embed secret"
    s.embed_secret = secret
    # The secret signs tokens the app accepts (so `expired_embed` fails only for its expiry).
    fresh = sign_embed_token(s.embed_secret, s.feed(PRIV), "owner", int(time.time()) + 600)
    await _expect(api, 200, "GET", f"/v1/feeds/{s.feed(PRIV)}/items", None, fresh)
    # The post reached every feed of the scenario.
    for key in (USER_FEED, EVENT_FEED, PUB, PRIV):
        items = (await _expect(api, 200, "GET", f"/v1/feeds/{s.feed(key)}/items", None, owner_token))["items"]
        assert [i["post"]["id"] for i in items] == [post["id"]], (key, items)
    return s


# -- effects: what a granted call changed, and that a refused one changed nothing --

Check = Callable[[Scenario, str, bool, Any], Awaitable[None]]


async def _members(sc: Scenario, list_key: str) -> list[str]:
    status, body = await sc.as_admin("GET", "/v1/lists/{%s}" % list_key)
    assert status == 200, body
    members: list[str] = body["list"]["members"]
    return members


async def check_create_user(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        assert body["user"]["handle"] == "newbie" and body["token"].startswith("sdu_") and body["token_id"]
    assert (await sc.call("GET", "/v1/users/newbie"))[0] == (200 if ok else 404)


async def check_get_user(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        assert body["user"]["handle"] == "owner"


async def check_issue_token(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        assert body["token_id"] and body["token"].startswith("sdu_")
        # A token of "owner" (not of the caller): it reads the owner's private list.
        assert (await sc.call("GET", "/v1/lists/{priv}", None, body["token"]))[0] == 200


async def check_revoke_token(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    assert (await sc.call("GET", "/v1/lists/{priv}", None, sc.spare))[0] == (401 if ok else 200)


async def check_create_post(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        post = body["post"]
        assert post["author"] == caller and post["text"] == "hello"  # always the token's user
        status, got = await sc.call("GET", f"/v1/posts/{post['id']}")
        assert status == 200 and got["post"] == post


async def check_get_post(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        assert body["post"] == sc.post


async def check_delete_post(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    assert (await sc.call("GET", "/v1/posts/{post_id}"))[0] == (404 if ok else 200)


async def check_create_list(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        made = body["list"]
        assert made["owner"] == caller and made["visibility"] == "private" and made["members"] == []
        assert made["name"] == "mine" and made["id"] not in (sc.pub, sc.priv)
    for handle, count in (("owner", 2 + (caller == OWNER and ok)), ("other", int(caller == OTHER and ok))):
        status, got = await sc.as_admin("GET", f"/v1/users/{handle}/lists")
        assert status == 200 and len(got["lists"]) == count, got


def check_get_list(list_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        if ok:
            got = body["list"]
            assert got["id"] == getattr(sc, list_key) and got["owner"] == "owner" and got["members"] == ["owner"]
            assert got["visibility"] == ("public" if list_key == PUB else "private")

    return check


def check_patch_list(list_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        if ok:
            assert body["list"]["description"] == "changed" and body["list"]["id"] == getattr(sc, list_key)
        status, got = await sc.as_admin("GET", "/v1/lists/{%s}" % list_key)
        assert status == 200 and got["list"]["description"] == ("changed" if ok else ""), got
        assert got["list"]["visibility"] == ("public" if list_key == PUB else "private")

    return check


def check_delete_list(list_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        assert (await sc.as_admin("GET", "/v1/lists/{%s}" % list_key))[0] == (404 if ok else 200)

    return check


def check_add_member(list_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        assert await _members(sc, list_key) == (["other", "owner"] if ok else ["owner"])

    return check


def check_remove_member(list_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        assert await _members(sc, list_key) == ([] if ok else ["owner"])

    return check


# GET /v1/users/owner/lists: "anyone (private lists only for owner, admin)".
VISIBLE_LISTS = {ANON: {PUB}, OTHER: {PUB}, OWNER: {PUB, PRIV}, ADMIN: {PUB, PRIV}, EMBED: {PUB}, EMBED_OTHER: {PUB}}


async def check_user_lists(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
    if ok:
        got = {entry["id"] for entry in body["lists"]}
        assert got == {getattr(sc, key) for key in VISIBLE_LISTS[caller]}, (caller, body)


def check_feed(feed_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        if ok:
            feed = sc.feed(feed_key)
            assert [(i["op"], i["feed"], i["post"]["id"]) for i in body["items"]] == [("post", feed, sc.post["id"])]
            assert body["next"] is None

    return check


def check_embed_token(feed_key: str) -> Check:
    async def check(sc: Scenario, caller: str, ok: bool, body: Any) -> None:
        if ok:
            feed = sc.feed(feed_key)
            assert body["token"].startswith("sde_") and body["feed"] == feed
            status, items = await sc.call("GET", f"/v1/feeds/{feed}/items", None, body["token"])
            assert status == 200 and len(items["items"]) == 1

    return check


# -- the HTTP table --------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    path: str
    body: Any
    feed: str  # which scenario feed `embed` / `embed_other` are about
    expect: dict[str, int]
    check: Check
    xfail: dict[str, str] = field(default_factory=dict)


def E(anon: int, other: int, owner: int, admin: int, embed: int, embed_other: int, revoked: int) -> dict[str, int]:
    return dict(zip(CALLERS, (anon, other, owner, admin, embed, embed_other, revoked), strict=True))


EVERYONE = E(200, 200, 200, 200, 200, 200, 401)
# owner, admin: a public list (refusals are 401 / 403) and a private one (hidden: 404).
# Embed tokens are read-only: a write with one is 403 whatever list it names.
MANAGE_PUBLIC = E(401, 403, 200, 200, 403, 403, 401)
MANAGE_PRIVATE = E(404, 404, 200, 200, 403, 403, 401)


def with_success(expect: dict[str, int], status: int) -> dict[str, int]:
    return {caller: status if code == 200 else code for caller, code in expect.items()}


ROUTES = [
    Route("create_user", "POST", "/v1/users", {"handle": "newbie"}, USER_FEED,
          E(401, 403, 403, 201, 403, 403, 401), check_create_user),
    Route("get_user", "GET", "/v1/users/owner", None, USER_FEED, EVERYONE, check_get_user),
    Route("issue_token", "POST", "/v1/users/owner/tokens", None, USER_FEED,
          E(401, 403, 201, 201, 403, 403, 401), check_issue_token),
    Route("revoke_token", "DELETE", "/v1/users/owner/tokens/{spare_id}", None, USER_FEED,
          E(401, 403, 204, 204, 403, 403, 401), check_revoke_token),
    Route("create_post", "POST", "/v1/posts", {"text": "hello"}, USER_FEED,
          E(401, 201, 201, 403, 403, 403, 401), check_create_post),
    Route("get_post", "GET", "/v1/posts/{post_id}", None, USER_FEED, EVERYONE, check_get_post),
    Route("delete_post", "DELETE", "/v1/posts/{post_id}", None, USER_FEED,
          E(401, 403, 204, 204, 403, 403, 401), check_delete_post),
    Route("create_list", "POST", "/v1/lists", {"name": "mine", "visibility": "private"}, PUB,
          E(401, 201, 201, 403, 403, 403, 401), check_create_list),
    Route("get_list_public", "GET", "/v1/lists/{pub}", None, PUB, EVERYONE, check_get_list(PUB)),
    Route("get_list_private", "GET", "/v1/lists/{priv}", None, PRIV,
          # "owner, admin if private": an embed token reads the list's feed, not the list.
          E(404, 404, 200, 200, 404, 404, 401), check_get_list(PRIV)),
    Route("patch_list_public", "PATCH", "/v1/lists/{pub}", {"description": "changed"}, PUB,
          MANAGE_PUBLIC, check_patch_list(PUB)),
    Route("patch_list_private", "PATCH", "/v1/lists/{priv}", {"description": "changed"}, PRIV,
          MANAGE_PRIVATE, check_patch_list(PRIV)),
    Route("delete_list_public", "DELETE", "/v1/lists/{pub}", None, PUB,
          with_success(MANAGE_PUBLIC, 204), check_delete_list(PUB)),
    Route("delete_list_private", "DELETE", "/v1/lists/{priv}", None, PRIV,
          with_success(MANAGE_PRIVATE, 204), check_delete_list(PRIV)),
    Route("add_member_public", "PUT", "/v1/lists/{pub}/members/other", None, PUB,
          with_success(MANAGE_PUBLIC, 204), check_add_member(PUB)),
    Route("add_member_private", "PUT", "/v1/lists/{priv}/members/other", None, PRIV,
          with_success(MANAGE_PRIVATE, 204), check_add_member(PRIV)),
    Route("remove_member_public", "DELETE", "/v1/lists/{pub}/members/owner", None, PUB,
          with_success(MANAGE_PUBLIC, 204), check_remove_member(PUB)),
    Route("remove_member_private", "DELETE", "/v1/lists/{priv}/members/owner", None, PRIV,
          with_success(MANAGE_PRIVATE, 204), check_remove_member(PRIV)),
    Route("user_lists", "GET", "/v1/users/owner/lists", None, PRIV, EVERYONE, check_user_lists),
    Route("feed_user", "GET", "/v1/feeds/user:owner/items", None, USER_FEED, EVERYONE, check_feed(USER_FEED)),
    Route("feed_event", "GET", "/v1/feeds/event:derby/items", None, EVENT_FEED, EVERYONE, check_feed(EVENT_FEED)),
    Route("feed_list_public", "GET", "/v1/feeds/list:{pub}/items", None, PUB, EVERYONE, check_feed(PUB)),
    Route("feed_list_private", "GET", "/v1/feeds/list:{priv}/items", None, PRIV,
          E(404, 404, 200, 200, 200, 404, 401), check_feed(PRIV)),
    Route("embed_token_user", "POST", "/v1/embed-tokens", {"feed": "user:owner", "ttl_seconds": 600}, USER_FEED,
          E(401, 403, 201, 201, 403, 403, 401), check_embed_token(USER_FEED)),
    Route("embed_token_event", "POST", "/v1/embed-tokens", {"feed": "event:derby", "ttl_seconds": 600}, EVENT_FEED,
          E(401, 403, 403, 201, 403, 403, 401), check_embed_token(EVENT_FEED)),
    Route("embed_token_list_public", "POST", "/v1/embed-tokens", {"feed": "list:{pub}", "ttl_seconds": 600}, PUB,
          E(401, 403, 201, 201, 403, 403, 401), check_embed_token(PUB)),
    # No token / an embed token: refused for what the caller is, before the list is looked at
    # (so nothing leaks); a user who cannot see the list: 404.
    Route("embed_token_list_private", "POST", "/v1/embed-tokens", {"feed": "list:{priv}", "ttl_seconds": 600}, PRIV,
          E(401, 404, 201, 201, 403, 403, 401), check_embed_token(PRIV)),
]


def _matrix() -> list[Any]:
    params = []
    for route in ROUTES:
        for caller in CALLERS:
            marks = [pytest.mark.xfail(strict=True, reason=route.xfail[caller])] if caller in route.xfail else []
            params.append(pytest.param(route, caller, id=f"{route.name}-{caller}", marks=marks))
    return params


def assert_error(status: int, body: Any) -> None:
    assert body["error"]["code"] == ERROR_CODES[status], body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


@pytest.mark.parametrize("route, caller", _matrix())
async def test_http_matrix(sc: Scenario, route: Route, caller: str) -> None:
    expected = route.expect[caller]
    status, body = await sc.call(route.method, route.path, route.body, sc.token(caller, route.feed))
    assert status == expected, (route.method, sc.fill(route.path), caller, body)
    ok = status < 300
    if not ok:
        assert_error(status, body)
    elif status == 204:
        assert body is None
    await route.check(sc, caller, ok, body)


# -- unknown tokens --------------------------------------------------------------


def _forged(token: str) -> str:
    """An embed token with its signature changed in its last character."""
    return token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]


@pytest.mark.parametrize(
    "route",
    [
        pytest.param(
            r,
            id=r.name,
            marks=[pytest.mark.xfail(strict=True, reason=r.xfail[REVOKED])] if REVOKED in r.xfail else [],
        )
        for r in ROUTES
    ],
)
async def test_unknown_tokens_are_401(sc: Scenario, route: Route) -> None:
    """Made-up user tokens, garbage, forged and expired embed tokens: 401 like a revoked token."""
    bad = ("sdu_" + "x" * 43, "not-a-token", "sde_x.y", _forged(sc.embeds[route.feed]), sc.expired_embed(route.feed))
    for token in bad:
        status, body = await sc.call(route.method, route.path, route.body, token)
        assert status == 401, (route.name, token, body)
        assert_error(status, body)
    await route.check(sc, ANON, False, None)  # and nothing changed


# -- private lists do not leak ------------------------------------------------------

LEAK_ROUTES = [
    ("get", "GET", "/v1/lists/{id}", None),
    ("patch", "PATCH", "/v1/lists/{id}", {"description": "changed"}),
    ("delete", "DELETE", "/v1/lists/{id}", None),
    ("add_member", "PUT", "/v1/lists/{id}/members/other", None),
    ("remove_member", "DELETE", "/v1/lists/{id}/members/owner", None),
    ("feed_items", "GET", "/v1/feeds/list:{id}/items", None),
    ("embed_token", "POST", "/v1/embed-tokens", {"feed": "list:{id}", "ttl_seconds": 600}),
]


@pytest.mark.parametrize("caller", [ANON, OTHER, EMBED_OTHER, REVOKED])
@pytest.mark.parametrize("name, method, path, body", LEAK_ROUTES, ids=[r[0] for r in LEAK_ROUTES])
async def test_private_list_answers_like_a_missing_list(
    sc: Scenario, name: str, method: str, path: str, body: Any, caller: str
) -> None:
    """Whoever may not read the private list cannot tell it from a list that does not exist."""
    token = sc.token(caller, PRIV)
    answers = []
    for list_id in (sc.priv, MISSING_LIST):
        sent = None if body is None else {k: v.format(id=list_id) if isinstance(v, str) else v for k, v in body.items()}
        status, reply = await sc.api.call(method, path.format(id=list_id), sent, token)
        assert status in (401, 403, 404), (name, caller, status, reply)
        answers.append((status, normal(reply, list_id)))
    assert answers[0] == answers[1]
    assert (await sc.as_admin("GET", "/v1/lists/{priv}"))[1]["list"]["members"] == ["owner"]


def normal(value: Any, list_id: str) -> Any:
    """`value` with the list id replaced, to compare the answers for two ids."""
    if isinstance(value, str):
        return value.replace(list_id, "<id>")
    if isinstance(value, dict):
        return {k: normal(v, list_id) for k, v in value.items()}
    if isinstance(value, list):
        return [normal(v, list_id) for v in value]
    return value


def without_ref(frame: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != "ref"}


# -- nobody posts as someone else -------------------------------------------------


async def test_cannot_post_as_someone_else(sc: Scenario) -> None:
    other = sc.user_token(OTHER)
    # An author in the body is not a field of a post: refused, not honoured.
    status, body = await sc.call("POST", "/v1/posts", {"text": "as owner", "author": "owner"}, other)
    assert status == 400 and body["error"]["code"] == "bad_request", body
    # An embed token the owner issued for their own feed cannot post for them.
    status, body = await sc.call("POST", "/v1/posts", {"text": "as owner"}, sc.embeds[USER_FEED])
    assert status == 403 and body["error"]["code"] == "forbidden", body
    # The same idempotency key from another author is another post, by that author.
    first = await sc.api.post(sc.user_token(OWNER), "first", idempotency_key="k1")
    second = await sc.api.post(other, "second", idempotency_key="k1")
    assert first["author"] == "owner" and second["author"] == "other"
    assert second["id"] != first["id"] and second["text"] == "second"


async def test_cannot_revoke_another_users_token_through_ones_own_path(sc: Scenario) -> None:
    other = sc.user_token(OTHER)
    status, body = await sc.call("DELETE", f"/v1/users/other/tokens/{sc.owner_token_id}", None, other)
    assert status == 404 and body["error"]["code"] == "not_found", body
    status, body = await sc.call("DELETE", f"/v1/users/other/tokens/{sc.spare_id}", None, other)
    assert status == 404, body
    assert (await sc.call("GET", "/v1/lists/{priv}", None, sc.tokens[OWNER]))[0] == 200
    assert (await sc.call("GET", "/v1/lists/{priv}", None, sc.spare))[0] == 200


# -- the socket -------------------------------------------------------------------


async def socket_as(ws_connect: Any, sc: Scenario, caller: str, feed_key: str) -> WsClient:
    """A socket that sent `auth` with the caller's token (none for anon)."""
    ws: WsClient = await ws_connect()
    token = sc.token(caller, feed_key)
    if token is not None:
        reply = await ws.request("auth", token=token)
        if caller == REVOKED:
            assert reply["op"] == "error" and reply["code"] == "unauthorized", reply
        else:
            assert reply["op"] == "ok", reply
    return ws


async def assert_open(ws: WsClient) -> None:
    reply = await ws.request("ping")
    assert reply == {"op": "pong", "ref": reply["ref"]}


AUTH_EXPECT = {OTHER: "ok", OWNER: "ok", ADMIN: "ok", EMBED: "ok", EMBED_OTHER: "ok", REVOKED: "unauthorized"}


@pytest.mark.parametrize("caller", [*AUTH_EXPECT, "unknown", "forged_embed", "expired_embed"])
async def test_ws_auth_op(sc: Scenario, ws_connect: Any, caller: str) -> None:
    bad = {
        "unknown": "sdu_" + "x" * 43,
        "forged_embed": _forged(sc.embeds[PRIV]),
        "expired_embed": sc.expired_embed(PRIV),
    }
    token = bad[caller] if caller in bad else sc.token(caller, PRIV)
    ws = await ws_connect()
    await ws.send(op="auth", ref="a1", token=token)
    reply = await ws.recv()
    if AUTH_EXPECT.get(caller, "unauthorized") == "ok":
        assert reply == {"op": "ok", "ref": "a1"}
    else:
        assert reply["op"] == "error" and reply["code"] == "unauthorized" and reply["ref"] == "a1", reply
        assert reply["message"]
    await assert_open(ws)  # an error does not close the socket


@pytest.mark.parametrize("caller", [c for c in CALLERS if c != ANON] + ["unknown", "expired_embed"])
async def test_ws_token_on_the_upgrade(sc: Scenario, ws_connect: Any, caller: str) -> None:
    """`?token=` on the URL: a good token opens the socket as that caller, a bad one is HTTP 401."""
    bad = {"unknown": "sdu_" + "x" * 43, "expired_embed": sc.expired_embed(PRIV)}
    token = bad[caller] if caller in bad else sc.token(caller, PRIV)
    if caller in (REVOKED, *bad):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await ws_connect(params={"token": token})
        assert err.value.status == 401
        return
    ws = await ws_connect(params={"token": token})
    reply = await ws.request("subscribe", feed=sc.feed(PRIV))
    if caller in (OWNER, ADMIN, EMBED):
        assert reply["op"] == "subscribed" and reply["feed"] == sc.feed(PRIV), reply
    else:
        assert reply["op"] == "error" and reply["code"] == "not_found" and reply["feed"] == sc.feed(PRIV), reply


# Who may subscribe to each feed: user:, event: and public lists are public; a private list's
# feed is readable by its owner, admin and an embed token for it. A revoked token's `auth`
# fails and the socket stays anonymous.
SUBSCRIBE_ALLOWED = {
    USER_FEED: set(CALLERS),
    EVENT_FEED: set(CALLERS),
    PUB: set(CALLERS),
    PRIV: {OWNER, ADMIN, EMBED},
}


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("feed_key", [USER_FEED, EVENT_FEED, PUB, PRIV])
async def test_ws_subscribe(sc: Scenario, ws_connect: Any, feed_key: str, caller: str) -> None:
    ws = await socket_as(ws_connect, sc, caller, feed_key)
    feed = sc.feed(feed_key)
    reply = await ws.request("subscribe", feed=feed, backlog=1)
    if caller in SUBSCRIBE_ALLOWED[feed_key]:
        assert reply["op"] == "subscribed" and reply["feed"] == feed and reply["gap"] is False, reply
        item = await ws.recv()
        assert (item["op"], item["feed"], item["post"]) == ("post", feed, sc.post), item
        return
    assert reply["op"] == "error" and reply["code"] == "not_found" and reply["feed"] == feed, reply
    # Exactly what a list that does not exist answers.
    missing = await ws.request("subscribe", feed=f"list:{MISSING_LIST}")
    assert without_ref(normal(reply, sc.priv)) == without_ref(normal(missing, MISSING_LIST))
    await assert_open(ws)


@pytest.mark.parametrize("caller", CALLERS)
async def test_ws_unsubscribe_and_ping(sc: Scenario, ws_connect: Any, caller: str) -> None:
    ws = await socket_as(ws_connect, sc, caller, PRIV)
    await ws.subscribe("user:owner")
    reply = await ws.request("unsubscribe", feed="user:owner")
    assert reply == {"op": "unsubscribed", "ref": reply["ref"], "feed": "user:owner"}
    # Unsubscribing from a feed one never had (and may not read) says nothing more than that.
    feed = sc.feed(PRIV)
    reply = await ws.request("unsubscribe", feed=feed)
    assert reply == {"op": "unsubscribed", "ref": reply["ref"], "feed": feed}
    await ws.send(op="ping", ref="p")
    assert await ws.recv() == {"op": "pong", "ref": "p"}


# -- revocation closes sockets -----------------------------------------------------


async def open_with(ws_connect: Any, how: str, token: str) -> WsClient:
    ws: WsClient
    if how == "query":
        ws = await ws_connect(params={"token": token})
    elif how == "header":
        ws = await ws_connect(headers={"Authorization": f"Bearer {token}"})
    else:
        ws = await ws_connect()
        reply = await ws.request("auth", token=token)
        assert reply == {"op": "ok", "ref": reply["ref"]}
    return ws


@pytest.mark.parametrize("how", ["query", "header", "auth_op"])
@pytest.mark.parametrize("revoker", [OWNER, ADMIN])
async def test_revoking_a_token_closes_its_sockets_with_4001(
    sc: Scenario, ws_connect: Any, how: str, revoker: str
) -> None:
    doomed = await open_with(ws_connect, how, sc.spare)
    await doomed.subscribe(sc.feed(PRIV))
    bystander = await open_with(ws_connect, how, sc.user_token(OWNER))
    await bystander.subscribe(sc.feed(PRIV))
    status, body = await sc.call("DELETE", "/v1/users/owner/tokens/{spare_id}", None, sc.token(revoker, USER_FEED))
    assert status == 204, body
    assert await doomed.closed() == 4001
    await assert_open(bystander)  # another token of the same user is untouched
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await ws_connect(params={"token": sc.spare})
    assert err.value.status == 401


@pytest.mark.parametrize("revoker", [ANON, OTHER, EMBED, EMBED_OTHER, REVOKED])
async def test_a_refused_revoke_leaves_the_socket_open(sc: Scenario, ws_connect: Any, revoker: str) -> None:
    ws = await open_with(ws_connect, "auth_op", sc.spare)
    await ws.subscribe(sc.feed(PRIV))
    status, body = await sc.call("DELETE", "/v1/users/owner/tokens/{spare_id}", None, sc.token(revoker, USER_FEED))
    assert status == (401 if revoker in (ANON, REVOKED) else 403), body
    await assert_open(ws)
    assert (await sc.call("GET", "/v1/lists/{priv}", None, sc.spare))[0] == 200
