"""Support for the browser tests: a Chromium to drive, a third-party host page, probes.

The host page is served by a second small aiohttp server on another port (so
another origin) under a strict Content-Security-Policy, the way a publisher
would embed the widget. What the page saw (CSP violations, layout shifts,
widget events) is recorded by an init script, which Chromium runs outside the
page's CSP.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
MEDIA_ORIGIN = "https://media.streamd.test"  # answered by a Playwright route, never by the network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def find_chromium() -> str | None:
    """$STREAMD_CHROMIUM, else a Chromium or Chrome from PATH (Debian: apt-get install chromium)."""
    explicit = os.environ.get("STREAMD_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def png(width: int, height: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> bytes:
    """A vertical gradient as a PNG, for media cards."""
    rows = []
    for y in range(height):
        t = y / max(1, height - 1)
        pixel = bytes(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        rows.append(b"\x00" + pixel * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# Runs before any page script, in every page, whatever the page's CSP.
PROBES = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => __csp.push(e.violatedDirective + ' ' + e.blockedURI));
window.__cls = 0;
window.__shifts = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    if (!e.hadRecentInput) { __cls += e.value; __shifts.push({value: e.value, at: e.startTime}); }
  }
}).observe({type: 'layout-shift', buffered: true});
window.__posts = [];
window.__states = [];
document.addEventListener('streamd:post', (e) => __posts.push(e.detail.post.id));
document.addEventListener('streamd:status', (e) => __states.push(e.detail.state));
"""

# Evaluated in the page: the widget's shadow root and what it shows.
SHADOW = "document.querySelector('streamd-feed').shadowRoot"
IDS = f"[...{SHADOW}.querySelectorAll('article')].map((a) => a.dataset.id)"

HOST_CSS = """
:root{color-scheme:light dark}
body{margin:0;font:17px/1.6 Georgia,serif;background:#faf8f4;color:#222}
@media (prefers-color-scheme:dark){body{background:#101214;color:#ddd}}
main{max-width:640px;margin:0 auto;padding:8px 20px 40px}
h1{font:700 28px/1.2 system-ui,sans-serif;margin:16px 0 4px}
.kicker{font:600 13px system-ui,sans-serif;letter-spacing:.08em;text-transform:uppercase;color:#b4361f}
/* the publisher reserves the widget's box, so nothing moves while embed.js loads */
streamd-feed{display:block;height:420px;margin:20px 0}
"""


def host_page(base: str, feed: str, *, limit: int = 20, theme: str | None = None, extra: str = "") -> str:
    theme_attr = f' theme="{theme}"' if theme else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>The Derby Daily: race day live</title>
<meta name="streamd:height" content="420">
<link rel="stylesheet" href="/host.css">
<script type="module" src="{base}/embed.js" async></script>
</head>
<body>
<main>
<div class="kicker">Race day</div>
<h1>Derby day, as it happens</h1>
<p>The gates open at two. Our riders and trainers post from the paddock, the stands and the rail;
their posts land below the moment they are written.</p>
<streamd-feed feed="{feed}" limit="{limit}"{theme_attr}{extra}>
  <a href="{base}/watch/{feed}">Live: Derby day</a>
</streamd-feed>
<p>Going is good to firm after a dry week. The draw favours the low stalls over the first furlong,
and the pace looks strong with three confirmed front-runners in the field.</p>
<p><label>Search the race card <input id="search" type="search"></label></p>
<p>Last year's winner returns carrying a penalty; the market has her third favourite.</p>
</main>
</body>
</html>
"""


class HostSite:
    """A publisher's site on another origin with a strict CSP."""

    def __init__(self, streamd_base: str) -> None:
        self.streamd = streamd_base
        ws = streamd_base.replace("http://", "ws://", 1)
        self.csp = (
            f"default-src 'none'; script-src {streamd_base}/embed.js; connect-src {streamd_base} {ws}; "
            f"img-src {MEDIA_ORIGIN}; style-src 'self'; base-uri 'none'; form-action 'none'; "
            "require-trusted-types-for 'script'; trusted-types 'none'"
        )
        self.pages: dict[str, str] = {}
        app = web.Application()
        app.router.add_get("/host.css", self._css)
        app.router.add_get("/{name:.*}", self._page)
        self.server = TestServer(app, host="127.0.0.1")

    async def __aenter__(self) -> HostSite:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.close()

    def add(self, name: str, html: str) -> str:
        self.pages[name] = html
        return str(self.server.make_url("/" + name))

    async def _css(self, request: web.Request) -> web.Response:
        return web.Response(text=HOST_CSS, content_type="text/css")

    async def _page(self, request: web.Request) -> web.Response:
        html = self.pages.get(request.match_info["name"])
        if html is None:
            raise web.HTTPNotFound()
        return web.Response(text=html, content_type="text/html", headers={"Content-Security-Policy": self.csp})
