"""HTTP routes of curated lists."""

from __future__ import annotations

from aiohttp import web

from streamd.errors import BadRequest, Forbidden
from streamd.feeds import valid_handle
from streamd.http_base import AUTH, LISTS, json_response, read_json, token_of

routes = web.RouteTableDef()


@routes.post("/v1/lists")
async def create_list(request: web.Request) -> web.Response:
    who = await request.app[AUTH].require_writer(token_of(request))
    if who.kind != "user" or who.handle is None:
        raise Forbidden("lists are owned by users: create one with a user token")
    lists = request.app[LISTS]
    record = await lists.create(who.handle, await read_json(request))
    return json_response({"list": await lists.view(record)}, status=201)


@routes.get("/v1/lists/{list_id}")
async def get_list(request: web.Request) -> web.Response:
    who = await request.app[AUTH].principal(token_of(request))
    lists = request.app[LISTS]
    record = await lists.readable(who, request.match_info["list_id"])
    return json_response({"list": await lists.view(record)})


@routes.patch("/v1/lists/{list_id}")
async def update_list(request: web.Request) -> web.Response:
    who = await request.app[AUTH].principal(token_of(request))
    lists = request.app[LISTS]
    record = await lists.managed(who, request.match_info["list_id"])
    updated = await lists.update(record, await read_json(request))
    return json_response({"list": await lists.view(updated)})


@routes.delete("/v1/lists/{list_id}")
async def delete_list(request: web.Request) -> web.Response:
    who = await request.app[AUTH].principal(token_of(request))
    lists = request.app[LISTS]
    await lists.delete(await lists.managed(who, request.match_info["list_id"]))
    return web.Response(status=204)


async def _member_change(request: web.Request, present: bool) -> web.Response:
    auth = request.app[AUTH]
    who = await auth.principal(token_of(request))
    lists = request.app[LISTS]
    record = await lists.managed(who, request.match_info["list_id"])
    handle = request.match_info["handle"]
    if not valid_handle(handle):
        raise BadRequest("handle must match [a-z0-9_]{1,32}")
    if present:
        await auth.get_user(handle)  # 404 for a user who does not exist
    await lists.set_member(record, handle, present)
    return web.Response(status=204)


@routes.put("/v1/lists/{list_id}/members/{handle}")
async def add_member(request: web.Request) -> web.Response:
    return await _member_change(request, True)


@routes.delete("/v1/lists/{list_id}/members/{handle}")
async def remove_member(request: web.Request) -> web.Response:
    return await _member_change(request, False)


@routes.get("/v1/users/{handle}/lists")
async def lists_of_user(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    who = await auth.principal(token_of(request))
    handle = request.match_info["handle"]
    await auth.get_user(handle)
    return json_response({"lists": await request.app[LISTS].owned_by(handle, who)})
