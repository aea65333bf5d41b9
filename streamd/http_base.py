"""What every HTTP handler shares: app keys, JSON in and out, the caller's token."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from streamd.auth import Auth, bearer
from streamd.errors import BadRequest
from streamd.hub import Hub
from streamd.lists import Lists
from streamd.settings import Settings
from streamd.store import AnyRedis, Scripts

# A union is no class to pass as AppKey's second argument: it goes in the subscript.
REDIS = web.AppKey[AnyRedis]("redis")
SETTINGS = web.AppKey("settings", Settings)
AUTH = web.AppKey("auth", Auth)
SCRIPTS = web.AppKey("scripts", Scripts)
LISTS = web.AppKey("lists", Lists)
HUB = web.AppKey("hub", Hub)


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


async def read_object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = body.keys() - allowed
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    return body


def token_of(request: web.Request) -> str | None:
    """`Authorization: Bearer`, else `?token=` (for EventSource and embeds)."""
    header = request.headers.get("Authorization")
    if header:
        return bearer(header)
    return request.query.get("token") or None


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value
