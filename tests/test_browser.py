"""The widget in a real browser: Playwright driving a system Chromium, headless.

Skipped, and the summary says why, when Playwright or a Chromium is missing
(`.ci/run` installs Debian's chromium so CI always runs them). The screenshots
in docs/screenshots/ are made here.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from streamd import keys
from streamd.http_base import HUB
from tests.browser_support import (
    CHROMIUM_ARGS,
    IDS,
    MEDIA_ORIGIN,
    PROBES,
    SCREENSHOTS,
    SHADOW,
    HostSite,
    find_chromium,
    host_page,
    png,
)
from tests.helpers import Api

CHROMIUM = find_chromium()
try:
    from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]

if async_playwright is None or CHROMIUM is None:
    WHY = "; ".join(
        ([] if async_playwright is not None else ["playwright is not installed (pip install -e '.[dev]')"])
        + ([] if CHROMIUM is not None else ["no Chromium found (apt-get install chromium, or set STREAMD_CHROMIUM)"])
    )
    if os.environ.get("STREAMD_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required here but cannot run: {WHY}", pytrace=False)
    pytest.skip(f"browser tests SKIPPED: {WHY}", allow_module_level=True)

SLUG = "derby-day"
FEED = f"event:{SLUG}"
IMAGE = png(320, 180, (236, 151, 52), (120, 46, 90))


@dataclass
class Tab:
    page: Page
    context: BrowserContext
    errors: list[str] = field(default_factory=list)

    async def ids(self) -> list[str]:
        ids: list[str] = await self.page.evaluate(IDS)
        return ids

    async def shows(self, expected: list[str], timeout: float = 5.0) -> None:
        """Wait until the widget shows exactly `expected`, newest first."""
        want = json.dumps(expected, separators=(",", ":"))  # as JSON.stringify writes it
        try:
            predicate = f"(want) => JSON.stringify({IDS}) === want"
            await self.page.wait_for_function(predicate, arg=want, timeout=timeout * 1000)
        except Exception:
            assert await self.ids() == expected, (self.errors, await self.probe("__csp"), await self.probe("__states"))
            raise

    async def probe(self, name: str) -> Any:
        return await self.page.evaluate(f"window.{name}")

    async def part(self, name: str, what: str) -> Any:
        return await self.page.evaluate(f"{SHADOW}.querySelector('[part={name}]').{what}")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None and CHROMIUM is not None
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def site(server: TestServer) -> AsyncIterator[HostSite]:
    async with HostSite(base(server)) as host:
        yield host


def base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def open_tab(
    browser: Browser, url: str, *, dark: bool = False, reduced_motion: bool = False, width: int = 760
) -> Tab:
    context = await browser.new_context(
        viewport={"width": width, "height": 800},
        color_scheme="dark" if dark else "light",
        reduced_motion="reduce" if reduced_motion else "no-preference",
    )
    await context.add_init_script(PROBES)

    async def media(route: Route) -> None:
        await route.fulfill(body=IMAGE, content_type="image/png")

    await context.route(MEDIA_ORIGIN + "/**", media)
    page = await context.new_page()
    tab = Tab(page, context)
    page.on("console", lambda msg: tab.errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))
    await page.goto(url)
    return tab


async def history(api: Api, feed: str = FEED, limit: int = 100) -> list[str]:
    status, body = await api.call("GET", f"/v1/feeds/{feed}/items?limit={limit}")
    assert status == 200, body
    return [item["post"]["id"] for item in body["items"]]


class Ledger:
    """The posts a test made on a feed: what the widget must end up showing."""

    def __init__(self, api: Api, token: str, feed: str = FEED) -> None:
        self.api, self.token, self.feed = api, token, feed
        self.live: set[str] = set()

    async def post(self, *texts: str, **fields: Any) -> list[str]:
        ids = [(await self.api.post(self.token, text, events=[SLUG], **fields))["id"] for text in texts]
        self.live.update(ids)
        return ids

    async def delete(self, post_id: str) -> None:
        status, body = await self.api.call("DELETE", f"/v1/posts/{post_id}", token=self.token)
        assert status == 204, body
        self.live.discard(post_id)

    def expected(self) -> list[str]:
        return sorted(self.live, key=lambda i: tuple(map(int, i.split("-"))), reverse=True)

    async def settled(self) -> list[str]:
        """The expected posts, newest first, once the feed's history holds exactly them
        (the fan-out is asynchronous)."""
        want = self.expected()
        deadline = time.monotonic() + 10
        while (ids := await history(self.api, self.feed)) != want and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert ids == want
        return want


def cut_every_socket(server: TestServer) -> int:
    hub = server.app[HUB]
    conns = [c for c in hub.connections if c.ws is not None]
    for conn in conns:
        hub.kill(conn, 1001)
    return len(conns)


# --- the tests ---------------------------------------------------------------------------


async def test_embedded_on_a_strict_csp_page_of_another_origin(
    browser: Browser, site: HostSite, api: Api, server: TestServer
) -> None:
    feed = Ledger(api, await api.user("jane"))
    backlog = await feed.post("Gates open at two", "Track is fast today", "Gate 4 is the place to be")
    await feed.settled()
    tab = await open_tab(browser, site.add("race", host_page(base(server), FEED, limit=5)))
    assert tab.page.url.split("/")[2] != base(server).split("/")[2], "the host page is on another origin"

    await tab.shows(backlog[::-1])  # the backlog, newest first
    roles = await tab.page.evaluate(
        f"[...{SHADOW}.querySelector('[role=feed]').children]"
        ".map((a) => [a.localName, a.getAttribute('aria-posinset')])"
    )
    assert roles == [["article", "1"], ["article", "2"], ["article", "3"]]
    assert await tab.part("feed", "getAttribute('aria-busy')") == "false"

    # Live: a new post is on the page within a second of being accepted.
    started = time.monotonic()
    (live,) = await feed.post("<img src=x onerror=alert(1)> <b>not bold</b>")
    await tab.page.wait_for_function(f"() => {IDS}.includes({json.dumps(live)})", timeout=1000)
    assert time.monotonic() - started < 1.0
    assert await tab.ids() == feed.expected()
    # Text is text: nothing in it became markup.
    article = f"{SHADOW}.querySelector('article[data-id=\"{live}\"]')"
    assert await tab.page.evaluate(f"{article}.querySelector('[part=text]').textContent") == (
        "<img src=x onerror=alert(1)> <b>not bold</b>"
    )
    assert await tab.page.evaluate(f"{article}.querySelectorAll('b, img').length") == 0

    # Media: a card with a fixed 16:9 box.
    (media,) = await feed.post("Paddock", media=[{"url": f"{MEDIA_ORIGIN}/p.png", "type": "image"}])
    await tab.shows(feed.expected())
    card = f"{SHADOW}.querySelector('article[data-id=\"{media}\"] [part=media-card]')"
    await tab.page.wait_for_function(f"() => {card}.querySelector('img').complete")
    width, height = await tab.page.evaluate(f"((r) => [r.width, r.height])({card}.getBoundingClientRect())")
    assert abs(width / height - 16 / 9) < 0.02, (width, height)

    # A deleted post disappears live.
    await feed.delete(backlog[1])
    await tab.shows(feed.expected(), timeout=1.0)

    assert await tab.probe("__csp") == []
    assert tab.errors == []
    assert set(await tab.probe("__posts")) == {*backlog, live, media}
    assert "live" in await tab.probe("__states")
    await tab.context.close()


async def test_catches_up_exactly_after_the_socket_is_cut(
    browser: Browser, site: HostSite, api: Api, server: TestServer
) -> None:
    feed = Ledger(api, await api.user("jane"))
    await feed.post("one", "two")
    tab = await open_tab(browser, site.add("race", host_page(base(server), FEED, limit=50)))
    await tab.shows(await feed.settled())

    # 1. The server drops the socket while posts are being made.
    await feed.post("three")
    assert cut_every_socket(server) == 1
    await feed.post("four", "five")
    await tab.shows(await feed.settled())

    # 2. The browser goes offline and the socket dies: the widget cannot reconnect...
    # (its backoff made long, so that only the `online` event can bring it back in time)
    await tab.page.evaluate("customElements.get('streamd-feed').backoff = [60000, 60000]; Math.random = () => 1")
    await tab.context.set_offline(True)
    await asyncio.sleep(0.2)
    assert cut_every_socket(server) == 1
    during = await feed.post("six", "seven", "eight")
    await feed.settled()
    await asyncio.sleep(1.0)
    assert not set(during) & set(await tab.ids()), "offline, nothing can arrive"
    assert (await tab.probe("__states"))[-1] in ("offline", "reconnecting")
    assert server.app[HUB].connections == set()
    # ...until it is back online: at once, not after its backoff.
    await tab.context.set_offline(False)
    await tab.shows(feed.expected(), timeout=3.0)

    # 3. Cut again; the page coming back into view (or from the back-forward cache)
    # reconnects at once too.
    for wake in ("document.dispatchEvent(new Event('visibilitychange'))", "dispatchEvent(new Event('pageshow'))"):
        await asyncio.sleep(0.2)
        assert cut_every_socket(server) == 1
        await feed.post(f"after {wake[:20]}")
        await feed.settled()
        await asyncio.sleep(0.3)
        assert await tab.ids() != feed.expected()
        await tab.page.evaluate(wake)
        await tab.shows(feed.expected(), timeout=2.0)

    shown = await tab.ids()
    assert len(shown) == len(set(shown)) == 10, "no duplicate, no gap"
    seen = await tab.probe("__posts")
    assert len(seen) == len(set(seen)) == 10, "each post announced once"
    await tab.context.close()


async def test_a_silently_dead_socket_is_caught_by_the_heartbeat_deadline(
    browser: Browser, site: HostSite, api: Api, server: TestServer
) -> None:
    """A socket left dead by sleep delivers nothing and never closes: the deadline ends it."""
    feed = Ledger(api, await api.user("jane"))
    await feed.post("before")
    tab = await open_tab(browser, site.add("race", host_page(base(server), FEED)))
    await tab.shows(await feed.settled())
    await tab.page.evaluate("customElements.get('streamd-feed').deadline = 1500")
    hub = server.app[HUB]
    (conn,) = list(hub.connections)
    hub.remove(conn)  # the server forgets it; the TCP connection stays open and silent
    (missed,) = await feed.post("while asleep")
    await feed.settled()
    await asyncio.sleep(0.5)
    assert missed not in await tab.ids()
    await tab.shows(feed.expected(), timeout=4.0)
    assert len(hub.connections) == 1 and conn not in hub.connections
    await tab.context.close()


async def test_a_gap_is_refilled_from_the_http_history(
    browser: Browser, site: HostSite, api: Api, server: TestServer, redis: Any
) -> None:
    feed = Ledger(api, await api.user("jane"))
    await feed.post("old one", "old two")
    tab = await open_tab(browser, site.add("race", host_page(base(server), FEED)))
    await tab.shows(await feed.settled())
    await tab.context.set_offline(True)
    cut_every_socket(server)
    # The feed's history is lost while the reader is away: its cursor no longer resumes.
    await redis.delete(keys.feed_stream(FEED), keys.feed_meta(FEED))
    feed.live.clear()
    await feed.post("new one", "new two")
    await feed.settled()
    await tab.context.set_offline(False)
    await tab.shows(feed.expected(), timeout=3.0)  # what the feed holds now, nothing twice
    await tab.context.close()


async def test_new_posts_banner_when_scrolled_insert_at_top_when_not_and_pause(
    browser: Browser, site: HostSite, api: Api, server: TestServer
) -> None:
    feed = Ledger(api, await api.user("jane"))
    await feed.post(*[f"Furlong {i}: still level" for i in range(12)])
    tab = await open_tab(browser, site.add("race", host_page(base(server), FEED)), reduced_motion=True)
    await tab.shows(await feed.settled())
    scroller = f"{SHADOW}.querySelector('[part=scroller]')"
    banner = tab.page.locator("streamd-feed [part=new-posts]")

    # Scrolled down: new posts wait behind an "N new posts" button; nothing moves.
    await tab.page.evaluate(f"{scroller}.scrollTop = 400")
    before = await tab.ids()
    await feed.post("Into the straight", "A length clear")
    await banner.filter(has_text="2 new posts").wait_for(timeout=2000)
    assert await tab.ids() == before
    assert await tab.page.evaluate(f"{scroller}.scrollTop") == 400
    await tab.page.wait_for_function(f"() => {SHADOW}.querySelector('[role=status]').textContent === '2 new posts'")
    await banner.click()
    await tab.shows(feed.expected())
    await tab.page.wait_for_function(f"() => {scroller}.scrollTop === 0", timeout=2000)
    assert await banner.is_hidden()

    # At the top: straight in at the top.
    await feed.post("Photo finish!")
    await tab.shows(feed.expected())
    assert await banner.is_hidden()

    # Paused: held back until resumed.
    pause = tab.page.locator("streamd-feed [part=pause-button]")
    await pause.click()
    assert await pause.text_content() == "Resume"
    assert await tab.part("state", "textContent") == "Paused"
    (held,) = await feed.post("Stewards' enquiry")
    await banner.filter(has_text="1 new post").wait_for(timeout=2000)
    assert held not in await tab.ids()
    await pause.click()
    await tab.shows(feed.expected())
    assert await tab.part("state", "textContent") == "Live"

    # mode="paused" does the same from the page.
    await tab.page.evaluate("document.querySelector('streamd-feed').setAttribute('mode', 'paused')")
    assert await pause.text_content() == "Resume"
    assert tab.errors == []
    await tab.context.close()


async def test_focus_stays_put_and_the_host_page_does_not_shift(
    browser: Browser, site: HostSite, api: Api, server: TestServer
) -> None:
    feed = Ledger(api, await api.user("jane"))
    await feed.post(*[f"Parade ring, horse {i}" for i in range(3)])
    tab = await open_tab(browser, site.add("race", host_page(base(server), FEED)))
    await tab.shows(await feed.settled())

    # Focus on the host page (a search box the reader types in).
    await tab.page.locator("#search").fill("favourite")
    await feed.post("Going down to the start", media=[{"url": f"{MEDIA_ORIGIN}/a.png", "type": "image"}])
    await tab.shows(feed.expected())
    assert await tab.page.evaluate("document.activeElement.id") == "search"
    assert await tab.page.evaluate(f"{SHADOW}.querySelector('article.fr') !== null")  # highlighted, motion allowed

    # Focus on a post inside the widget: insertions above and deletions elsewhere leave it there.
    shown = await tab.ids()
    await tab.page.evaluate(f"{SHADOW}.querySelector('article[data-id=\"{shown[1]}\"]').focus()")
    await feed.post("They're off!", "Clear at the furlong pole")
    await feed.delete(shown[3])
    await tab.shows(await feed.settled())
    assert await tab.page.evaluate("document.activeElement.localName") == "streamd-feed"
    assert await tab.page.evaluate(f"{SHADOW}.activeElement.dataset.id") == shown[1]

    cls = await tab.probe("__cls")
    assert cls < 0.1, await tab.probe("__shifts")
    assert tab.errors == []
    await tab.context.close()

    # With reduced motion, new posts are not animated.
    calm = await open_tab(browser, site.add("calm", host_page(base(server), FEED)), reduced_motion=True)
    await calm.shows(feed.expected())
    (last,) = await feed.post("Weighed in")
    await calm.shows(feed.expected())
    article = f"{SHADOW}.querySelector('article[data-id=\"{last}\"]')"
    name = await calm.page.evaluate(f"getComputedStyle({article}).animationName")
    assert name == "none"
    await calm.context.close()


async def test_watch_page_landing_page_and_screenshots(
    browser: Browser, site: HostSite, api: Api, server: TestServer
) -> None:
    """Real-looking pages, photographed into docs/screenshots/ (look at them after a change)."""
    riders = {name: Ledger(api, await api.user(name)) for name in ("jockey_jane", "trainer_tom", "paddock_pat")}
    everyone = Ledger(api, "")
    script = [
        ("paddock_pat", "Parade ring is packed. Northern Star looks magnificent, sweating up a little.", True),
        ("trainer_tom", "Happy with him. Drawn low, good to firm: everything we wanted.", False),
        ("jockey_jane", "Track is fast today, gate 4 is the place to be. See you in the winner's enclosure!", False),
        ("paddock_pat", "Going down to the start now. Eleven runners, all loaded without fuss.", False),
    ]
    for who, text, with_media in script:
        media = [{"url": f"{MEDIA_ORIGIN}/parade.png", "type": "image"}] if with_media else []
        everyone.live.update(await riders[who].post(text, media=media))
    shown = await everyone.settled()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    all_images = f"() => [...{SHADOW}.querySelectorAll('img')].every((i) => i.complete && i.naturalWidth > 0)"

    for dark in (False, True):
        name = "host-dark" if dark else "host-light"
        tab = await open_tab(browser, site.add(name, host_page(base(server), FEED, limit=10)), dark=dark)
        await tab.shows(shown)
        await tab.page.wait_for_function(all_images)
        await tab.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
        assert await tab.probe("__csp") == [] and tab.errors == []
        await tab.context.close()

    # The watch page: our own page, under our own CSP, on the same element.
    tab = await open_tab(browser, base(server) + f"/watch/{FEED}")
    await tab.shows(shown)
    assert await tab.page.title() == f"#{SLUG} · streamd live"
    await tab.page.wait_for_function(all_images)
    await tab.page.screenshot(path=str(SCREENSHOTS / "watch.png"), full_page=True)
    assert await tab.probe("__csp") == [] and tab.errors == []
    await tab.context.close()

    # The landing page: the builder writes the snippet and drives the live demo.
    tab = await open_tab(browser, base(server) + f"/?feed={FEED}", width=1100)
    await tab.shows(shown)
    snippet = await tab.page.locator("#snippet").input_value()
    assert f'<streamd-feed feed="{FEED}"' in snippet and f'src="{base(server)}/embed.js"' in snippet
    await tab.page.locator("select[name=theme]").select_option("dark")
    assert 'theme="dark"' in await tab.page.locator("#snippet").input_value()
    assert await tab.page.evaluate("document.querySelector('#demo').getAttribute('theme')") == "dark"
    await tab.page.locator("input[name=feed]").fill("user:trainer_tom")
    await tab.shows(await history(api, "user:trainer_tom"))
    await tab.page.screenshot(path=str(SCREENSHOTS / "landing.png"), full_page=True)
    assert await tab.probe("__csp") == [] and tab.errors == []
    await tab.context.close()
