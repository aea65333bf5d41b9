"""Feed history over HTTP: `GET /v1/feeds/{feed}/items`, newest first."""

from __future__ import annotations

import asyncio

from aiohttp import web

from streamd import cursors, history, keys, store
from streamd.errors import CloseCode, StreamdError, Unavailable
from streamd.feeds import parse_feed
from streamd.gateway import Session
from streamd.http_base import AUTH, HUB, LISTS, REDIS, SETTINGS, query_int, token_of
from streamd.hub import Connection
from streamd.protocol import ClientOp, error_frame
from streamd.sse import sse_chunk

routes = web.RouteTableDef()

# Deleted posts leave `delete` items in the history (for resuming sockets);
# the HTTP history shows what the feed holds now, so it skips them. The scan
# is bounded so that a run of deletes cannot make one request read forever.
MAX_SCAN_ROUNDS = 5


@routes.get("/v1/feeds/{feed}/items")
async def feed_items(request: web.Request) -> web.Response:
    feed = str(parse_feed(request.match_info["feed"]))
    who = await request.app[AUTH].principal(token_of(request))
    await request.app[LISTS].check_feed_readable(who, feed)
    limit = query_int(request, "limit", 20, 1, 100)
    before = request.query.get("before")
    upper = "+" if before is None else "(" + cursors.format_entry_id(cursors.decode(before).entry)
    client = request.app[REDIS]
    stream = keys.feed_stream(feed)
    epoch = (await history.snapshot(client, feed, 1)).epoch

    items: list[bytes] = []
    oldest_seen: str | None = None
    for _ in range(MAX_SCAN_ROUNDS):
        entries = store.as_entries(await client.xrevrange(stream, max=upper, min="-", count=limit))
        for entry in entries:
            oldest_seen = entry[0].decode()
            if entry[1].get(b"t") == b"post":
                items.append(history.item_frame(feed, epoch, entry))
                if len(items) == limit:
                    break
        if len(items) == limit or len(entries) < limit or oldest_seen is None:
            break
        upper = "(" + oldest_seen

    next_cursor = None
    if oldest_seen is not None and await client.xrevrange(stream, max="(" + oldest_seen, min="-", count=1):
        next_cursor = cursors.encode(epoch, oldest_seen)
    tail = b'"%s"' % next_cursor.encode() if next_cursor else b"null"
    body = b'{"items":[' + b",".join(items) + b'],"next":' + tail + b"}"
    return web.Response(body=body, content_type="application/json")


@routes.get("/v1/feeds/{feed}/events")
async def feed_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the feed's items as `id: <cursor>` / `event: post|delete`.

    Resumes after `Last-Event-ID` (or `?cursor=`); a gap is sent as `event: gap`.
    Everything that can be refused is checked before the response starts, so
    refusals are ordinary HTTP errors.
    """
    settings = request.app[SETTINGS]
    feed = str(parse_feed(request.match_info["feed"]))
    who = await request.app[AUTH].principal(token_of(request))
    lists = request.app[LISTS]
    await lists.check_feed_readable(who, feed)
    cursor = request.headers.get("Last-Event-ID") or request.query.get("cursor") or None
    if cursor is not None:
        cursors.decode(cursor)
    backlog = query_int(request, "backlog", 0, 0, settings.max_backlog)
    if not await store.answers(request.app[REDIS], timeout=2.0):
        # Redis down: a 503 now, not a stream that says nothing.
        raise Unavailable("storage is unavailable, try again")

    hub = request.app[HUB]
    start = None
    if cursor is None and backlog == 0:
        # The stream begins where the feed is before the response starts: a
        # client that has the headers gets everything posted after them,
        # however long the subscription then takes to be in place (under
        # Cluster, a connection to another node first).
        start = (await hub.histories.snapshot(feed, 1)).head_position
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    transport = request.transport
    assert transport is not None
    conn = Connection(None, transport, sse_chunk)
    conn.principal = who
    conn.done = asyncio.get_running_loop().create_future()
    hub.add(conn)
    session = Session(hub, request.app[AUTH], lists, settings, conn)
    session.principal = who
    try:
        await session.subscribe(ClientOp("subscribe", feed=feed, cursor=cursor, backlog=backlog), start)
    except StreamdError as err:
        err.feed = feed
        hub.send(conn, error_frame(err))
        hub.kill(conn, CloseCode.GOING_AWAY)
    try:
        await conn.done
    finally:
        if not conn.closed:
            hub.remove(conn)
    return response
