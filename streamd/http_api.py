"""HTTP routes: users and tokens, posts, embed tokens."""

from __future__ import annotations

import orjson
from aiohttp import web

from streamd import keys, store
from streamd.errors import BadRequest, Forbidden, NotFound
from streamd.feeds import parse_feed
from streamd.http_base import AUTH, LISTS, REDIS, SETTINGS, json_response, read_object, token_of
from streamd.ingest import INGEST
from streamd.posts import build_post, shard_of_post, valid_post_id

routes = web.RouteTableDef()


@routes.post("/v1/users")
async def create_user(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    await auth.require_admin(token_of(request))
    body = await read_object(request, frozenset({"handle", "display_name"}))
    user, token, token_id = await auth.create_user(body.get("handle"), body.get("display_name"))
    return json_response({"user": user, "token": token, "token_id": token_id}, status=201)


@routes.get("/v1/users/{handle}")
async def get_user(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    await auth.principal(token_of(request))  # a bad token is still 401
    user = await auth.get_user(request.match_info["handle"])
    return json_response({"user": user})


@routes.post("/v1/users/{handle}/tokens")
async def create_token(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    handle = request.match_info["handle"]
    auth.may_act_for(await auth.principal(token_of(request)), handle)
    await auth.get_user(handle)
    token, token_id = await auth.issue_token(handle)
    return json_response({"token": token, "token_id": token_id}, status=201)


@routes.delete("/v1/users/{handle}/tokens/{token_id}")
async def revoke_token(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    handle = request.match_info["handle"]
    auth.may_act_for(await auth.principal(token_of(request)), handle)
    await auth.revoke_token(handle, request.match_info["token_id"])
    return web.Response(status=204)


@routes.post("/v1/posts")
async def create_post(request: web.Request) -> web.Response:
    post, created = await request.app[INGEST].accept(token_of(request), request)
    return web.Response(
        body=orjson.dumps({"post": post}),
        status=201,
        content_type="application/json",
        headers=None if created else REPLAYED,
    )


REPLAYED = {"Idempotent-Replayed": "true"}


def _post_key(request: web.Request) -> tuple[str, int]:
    post_id = request.match_info["post_id"]
    if not valid_post_id(post_id):
        raise NotFound(f"no post {post_id[:40]!r}")
    return post_id, shard_of_post(post_id, request.app[SETTINGS].ingest_shards)


@routes.get("/v1/posts/{post_id}")
async def get_post(request: web.Request) -> web.Response:
    await request.app[AUTH].principal(token_of(request))  # a bad token is still 401
    post_id, shard = _post_key(request)
    author, body, deleted = await request.app[REDIS].hmget(keys.post_record(shard, post_id), "a", "d", "deleted")
    if author is None or deleted:
        raise NotFound(f"no post {post_id!r}")
    # Every post is in its author's feed, which is public.
    return json_response({"post": build_post(post_id, store.as_text(author), store.as_bytes(body))})


@routes.delete("/v1/posts/{post_id}")
async def delete_post(request: web.Request) -> web.Response:
    who = await request.app[AUTH].require_writer(token_of(request))
    post_id, shard = _post_key(request)
    result = await request.app[INGEST].delete(post_id, shard, "" if who.is_admin else who.handle or "")
    if result == 0:
        raise NotFound(f"no post {post_id!r}")
    if result == -1:
        raise Forbidden("only the post's author or admin may delete it")
    return web.Response(status=204)


@routes.post("/v1/embed-tokens")
async def create_embed_token(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    auth = request.app[AUTH]
    who = await auth.require_writer(token_of(request))
    body = await read_object(request, frozenset({"feed", "ttl_seconds"}))
    feed = parse_feed(body.get("feed"))
    ttl = body.get("ttl_seconds", 3600)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= settings.max_embed_ttl_seconds:
        raise BadRequest(f"ttl_seconds must be an integer from 1 to {settings.max_embed_ttl_seconds}")
    if feed.kind == "list":
        await request.app[LISTS].managed(who, feed.name)
    elif not (who.is_admin or (feed.kind == "user" and who.handle == feed.name)):
        raise Forbidden("only the feed's owner or admin may issue embed tokens for it")
    issuer = who.handle or "admin"
    token, expires_at = await auth.issue_embed_token(str(feed), issuer, ttl)
    return json_response({"token": token, "feed": str(feed), "expires_at": expires_at}, status=201)
