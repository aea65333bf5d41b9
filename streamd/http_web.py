"""The embeddable widget and the pages built on it.

`GET /embed.js` is the `<streamd-feed>` element; `GET /watch/{feed}` one feed
live on a full page; `GET /` a snippet builder with a live demo; `/site.css`
and `/site.js` are those pages' own assets. The files are package data in
`streamd/web/` (documented in `web/README.md`), read once at import.

Other origins embed the widget: the module script and the feed histories it
reads (`/v1/feeds/{feed}/items`, and the SSE stream beside it) answer with
`Access-Control-Allow-Origin: *`. That exposes nothing a direct request would
not get: streamd never authenticates by cookie, only by an explicit token.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from html import escape
from importlib import resources
from string import Template
from urllib.parse import quote

from aiohttp import web

from streamd.access import can_read, can_view_list
from streamd.auth import Principal
from streamd.errors import NotFound
from streamd.feeds import Feed, parse_feed
from streamd.http_base import AUTH, LISTS, token_of

routes = web.RouteTableDef()

WEB = resources.files("streamd").joinpath("web")

# Our own pages run the widget under the same strict policy we ask of hosts.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' https: data:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}
ASSET_CACHE = "public, max-age=300"  # a new widget reaches every host page within minutes
CROSS_ORIGIN = re.compile(r"/embed\.js|/v1/feeds/[^/]+/(items|events)")


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, name: str, content_type: str) -> Asset:
        body = WEB.joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        return cls(body, gzip.compress(body, 9, mtime=0), content_type, etag)


EMBED_JS = Asset.load("embed.js", "text/javascript")
SITE_JS = Asset.load("site.js", "text/javascript")
SITE_CSS = Asset.load("site.css", "text/css")
INDEX = Asset.load("index.html", "text/html")
WATCH = Template(WEB.joinpath("watch.html").read_text("utf-8"))


def accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            _, _, q = params.partition("q=")
            try:
                return not q or float(q) > 0
            except ValueError:
                return False
    return False


def serve(request: web.Request, asset: Asset, *, cache: str, headers: dict[str, str] | None = None) -> web.Response:
    """The asset, gzipped when the client takes it; 304 when its ETag is current."""
    out = {"Cache-Control": cache, "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff", **(headers or {})}
    if cache != "no-cache":
        out["ETag"] = asset.etag
        if asset.etag in (tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")):
            return web.Response(status=304, headers=out)
    body = asset.body
    if accepts_gzip(request.headers.get("Accept-Encoding", "")):
        body = asset.gzipped
        out["Content-Encoding"] = "gzip"
    return web.Response(body=body, content_type=asset.content_type, charset="utf-8", headers=out)


@routes.get("/embed.js")
async def embed_js(request: web.Request) -> web.Response:
    return serve(request, EMBED_JS, cache=ASSET_CACHE)


@routes.get("/site.js")
async def site_js(request: web.Request) -> web.Response:
    return serve(request, SITE_JS, cache=ASSET_CACHE)


@routes.get("/site.css")
async def site_css(request: web.Request) -> web.Response:
    return serve(request, SITE_CSS, cache=ASSET_CACHE)


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return serve(request, INDEX, cache="no-cache", headers=PAGE_HEADERS)


async def describe(request: web.Request, who: Principal | None, feed: Feed) -> tuple[str, str]:
    """The page title and the follower-facing line under it; NotFound as the feed's history would."""
    if feed.kind == "user":
        user = await request.app[AUTH].get_user(feed.name)
        return str(user.get("display_name") or "@" + feed.name), f"Everything @{feed.name} posts, live."
    if feed.kind == "event":
        return f"#{feed.name}", f"Every post tagged {feed.name}, live."
    record = await request.app[LISTS].record(feed.name)
    if record is None or not can_read(who, feed, record):
        raise NotFound(f"no list {feed.name!r}", feed=str(feed))
    if not can_view_list(who, record):  # an embed token reads a private list's feed, not the list
        return "A private list", "Posts from a private list, live."
    about = record.get("description") or f"Posts by the members of a list curated by @{record['owner']}, live."
    return str(record["name"]), str(about)


@routes.get("/watch/{feed}")
async def watch(request: web.Request) -> web.Response:
    feed = parse_feed(request.match_info["feed"])
    token = token_of(request)
    who = await request.app[AUTH].principal(token)
    title, about = await describe(request, who, feed)
    # Only an embed token (read-only, one feed, expiring) is ever written into a page.
    token_attr = f' token="{escape(token)}"' if token and who is not None and who.kind == "embed" else ""
    page = WATCH.substitute(
        title=escape(title),
        about=escape(about),
        feed=escape(str(feed)),
        feed_q=escape(quote(str(feed), safe=":")),
        token_attr=token_attr,
    )
    return web.Response(text=page, content_type="text/html", headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})


async def allow_cross_origin(request: web.Request, response: web.StreamResponse) -> None:
    if request.method in ("GET", "HEAD") and CROSS_ORIGIN.fullmatch(request.path):
        response.headers["Access-Control-Allow-Origin"] = "*"


def setup(app: web.Application) -> None:
    app.router.add_routes(routes)
    app.on_response_prepare.append(allow_cross_origin)
