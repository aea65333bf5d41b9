"""HTTP routes: users and tokens, posting, health."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from streamd import keys
from streamd.auth import Auth, bearer
from streamd.errors import BadRequest
from streamd.posts import build_post, ingest_shard, validate_new_post
from streamd.settings import Settings
from streamd.store import Scripts

SETTINGS = web.AppKey("settings", Settings)
AUTH = web.AppKey("auth", Auth)
SCRIPTS = web.AppKey("scripts", Scripts)

routes = web.RouteTableDef()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request) -> Any:
    raw = await request.read()  # aiohttp enforces client_max_size (413)
    if not raw:
        raise BadRequest("request body is empty: send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None


def token_of(request: web.Request) -> str | None:
    return bearer(request.headers.get("Authorization"))


@routes.post("/v1/users")
async def create_user(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    await auth.require_admin(token_of(request))
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = body.keys() - {"handle", "display_name"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    user, token, token_id = await auth.create_user(body.get("handle"), body.get("display_name"))
    return json_response({"user": user, "token": token, "token_id": token_id}, status=201)


@routes.get("/v1/users/{handle}")
async def get_user(request: web.Request) -> web.Response:
    user = await request.app[AUTH].get_user(request.match_info["handle"])
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
    settings = request.app[SETTINGS]
    who = await request.app[AUTH].require_user(token_of(request))
    author = who.handle
    assert author is not None
    new = validate_new_post(await read_json(request), settings)
    shard = ingest_shard(author, settings.ingest_shards)
    stream = keys.ingest_stream(shard)
    key_digest = new.idempotency_digest()
    idem_key = keys.idempotency(shard, author, key_digest) if key_digest else stream
    ttl = settings.idempotency_ttl_seconds if key_digest else 0
    created, entry_id, body_json = await request.app[SCRIPTS].ingest_post(
        keys=[stream, idem_key], args=[author, new.body_json(), ttl]
    )
    post = build_post(entry_id.decode(), author, body_json)
    headers = None if created else {"Idempotent-Replayed": "true"}
    return json_response({"post": post}, status=201, headers=headers)
