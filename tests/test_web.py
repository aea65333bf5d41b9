"""The widget's routes without a browser: /embed.js, the pages, CORS for embeds, the size budget."""

from __future__ import annotations

import fnmatch
import gzip
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from streamd import http_web
from tests.helpers import ADMIN_TOKEN, Api

ROOT = Path(__file__).resolve().parent.parent
WEB = resources.files("streamd").joinpath("web")
BUDGET_GZIPPED = 10 * 1024
OTHER_ORIGIN = {"Origin": "https://publisher.example"}


async def get(session: aiohttp.ClientSession, server: TestServer, path: str, **headers: str) -> tuple[Any, bytes]:
    async with session.get(server.make_url(path), headers=headers) as resp:
        return resp, await resp.read()


def test_the_widget_fits_its_size_budget() -> None:
    source = WEB.joinpath("embed.js").read_bytes()
    gzipped = len(gzip.compress(source, 9))
    assert gzipped <= BUDGET_GZIPPED, f"embed.js is {gzipped} bytes gzipped, over the {BUDGET_GZIPPED}-byte budget"
    assert len(http_web.EMBED_JS.gzipped) == gzipped  # what is served is what was measured


def test_the_widget_source_is_safe_under_a_strict_csp() -> None:
    """No HTML parsing of strings, no eval, no inline style: what a strict CSP or Trusted Types would refuse."""
    source = WEB.joinpath("embed.js").read_text("utf-8")
    code = re.sub(r"^\s*//.*$", "", source, flags=re.M)
    for forbidden in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "setTimeout('",
        ".style.",
        "'style'",
        "createContextualFragment",
        "import(",
    ):
        assert forbidden not in code, forbidden
    assert "adoptedStyleSheets" in code and "textContent" in code


async def test_embed_js_is_served_to_every_origin_gzipped_and_cached(
    server: TestServer, session: aiohttp.ClientSession
) -> None:
    resp, body = await get(session, server, "/embed.js", **OTHER_ORIGIN)
    assert resp.status == 200 and resp.content_type == "text/javascript"
    assert body == WEB.joinpath("embed.js").read_bytes()
    assert resp.headers["Access-Control-Allow-Origin"] == "*"  # a cross-origin module script needs CORS
    assert resp.headers["Cache-Control"].startswith("public, max-age=")
    etag = resp.headers["ETag"]

    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(server.make_url("/embed.js"), headers={"Accept-Encoding": "gzip, br"}) as zipped:
            assert zipped.headers["Content-Encoding"] == "gzip"
            assert zipped.headers["Vary"] == "Accept-Encoding"
            assert gzip.decompress(await zipped.read()) == body
        async with raw.get(server.make_url("/embed.js"), headers={"Accept-Encoding": "gzip;q=0"}) as plain:
            assert "Content-Encoding" not in plain.headers and await plain.read() == body

    resp, body = await get(session, server, "/embed.js", **{"If-None-Match": etag})
    assert resp.status == 304 and body == b""


@pytest.mark.parametrize(("path", "content_type"), [("/site.css", "text/css"), ("/site.js", "text/javascript")])
async def test_page_assets(server: TestServer, session: aiohttp.ClientSession, path: str, content_type: str) -> None:
    resp, body = await get(session, server, path)
    assert resp.status == 200 and resp.content_type == content_type and body
    resp, _ = await get(session, server, path, **{"If-None-Match": resp.headers["ETag"]})
    assert resp.status == 304


async def test_feed_history_answers_other_origins_and_nothing_else_does(
    api: Api, server: TestServer, session: aiohttp.ClientSession
) -> None:
    alice = await api.user("alice")
    status, body = await api.call("POST", "/v1/lists", {"name": "Mine", "visibility": "private"}, alice)
    assert status == 201, body
    for path, status in [
        ("/v1/feeds/event:derby-day/items?limit=5", 200),
        (f"/v1/feeds/list:{body['list']['id']}/items", 404),  # errors too: the widget reads them
        ("/v1/feeds/nonsense/items", 400),
    ]:
        resp, _ = await get(session, server, path, **OTHER_ORIGIN)
        assert resp.status == status
        assert resp.headers.get("Access-Control-Allow-Origin") == "*", path
    for path in ("/v1/users/alice", "/v1/openapi.json", "/healthz"):
        resp, _ = await get(session, server, path, **OTHER_ORIGIN)
        assert "Access-Control-Allow-Origin" not in resp.headers, path


def csp_of(resp: Any) -> str:
    csp: str = resp.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    return csp


async def test_landing_page(server: TestServer, session: aiohttp.ClientSession) -> None:
    resp, body = await get(session, server, "/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert "script-src 'self'" in csp_of(resp)
    page = body.decode()
    assert '<script type="module" src="/embed.js">' in page and '<script type="module" src="/site.js">' in page
    assert "<streamd-feed" in page and 'id="snippet"' in page
    assert "<style" not in page and "style=" not in page and "<script>" not in page


async def test_watch_page_of_events_and_users(api: Api, server: TestServer, session: aiohttp.ClientSession) -> None:
    resp, body = await get(session, server, "/watch/event:derby-day")
    assert resp.status == 200 and resp.content_type == "text/html"
    csp_of(resp)
    page = body.decode()
    assert "<title>#derby-day · streamd live</title>" in page
    assert '<streamd-feed feed="event:derby-day"' in page and "token=" not in page
    assert "<style" not in page and "style=" not in page

    jane = {"handle": "jane", "display_name": 'Jane "J" <Doe>'}
    status, _ = await api.call("POST", "/v1/users", jane, ADMIN_TOKEN)
    assert status == 201
    resp, body = await get(session, server, "/watch/user:jane")
    assert resp.status == 200
    assert "<h1>Jane &quot;J&quot; &lt;Doe&gt;</h1>" in body.decode()

    resp, body = await get(session, server, "/watch/user:nobody")
    assert resp.status == 404 and resp.content_type == "application/json"
    resp, _ = await get(session, server, "/watch/not-a-feed")
    assert resp.status == 400
    resp, _ = await get(session, server, "/watch/event:derby-day?token=sdu_nope")
    assert resp.status == 401


async def test_watch_page_of_lists(api: Api, server: TestServer, session: aiohttp.ClientSession) -> None:
    owner = await api.user("owner")
    public = {"name": "<b>Top</b> riders", "description": 'Follow the "best" & brightest', "visibility": "public"}
    status, body = await api.call("POST", "/v1/lists", public, owner)
    assert status == 201
    resp, page = await get(session, server, f"/watch/list:{body['list']['id']}")
    assert resp.status == 200
    assert "<h1>&lt;b&gt;Top&lt;/b&gt; riders</h1>" in page.decode()
    assert '<p class="about">Follow the &quot;best&quot; &amp; brightest</p>' in page.decode()

    status, body = await api.call("POST", "/v1/lists", {"name": "Secret", "visibility": "private"}, owner)
    feed = f"list:{body['list']['id']}"
    resp, _ = await get(session, server, f"/watch/{feed}")
    assert resp.status == 404  # a private list does not leak its existence
    status, body = await api.call("POST", "/v1/embed-tokens", {"feed": feed, "ttl_seconds": 600}, owner)
    assert status == 201
    embed = body["token"]
    resp, page = await get(session, server, f"/watch/{feed}?token={embed}")
    assert resp.status == 200
    text = page.decode()
    # The embed token reads the feed, not the list: no name, no description; it is handed to the widget.
    assert "Secret" not in text and f'token="{embed}"' in text
    resp, page = await get(session, server, f"/watch/{feed}?token={owner}")
    assert resp.status == 200 and "Secret" in page.decode()
    assert owner not in page.decode(), "a user token is never written into a page"


def test_web_files_ship_with_the_package() -> None:
    """Every served file is package data, so a plain (non-editable) install serves them too."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["streamd"]
    files = sorted(p.relative_to(ROOT / "streamd").as_posix() for p in (ROOT / "streamd" / "web").iterdir())
    assert {"web/embed.js", "web/index.html", "web/watch.html", "web/site.css", "web/site.js"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), f"{name} is not package data"
