"""Feed history over HTTP: `GET /v1/feeds/{feed}/items`, newest first."""

from __future__ import annotations

from aiohttp import web

from streamd import cursors, history, keys
from streamd.feeds import parse_feed
from streamd.http_base import AUTH, LISTS, REDIS, token_of, query_int

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
        entries = await client.xrevrange(stream, max=upper, min="-", count=limit)
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
