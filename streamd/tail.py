"""The terminal client: `streamd tail` (a live view of feeds) and `streamd post`.

Items go to stdout, one line each (a few for multi-line text and media);
what the connection does (subscribed, reconnecting, refused) goes to stderr,
so `streamd tail ... | grep` keeps only posts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, TextIO

import aiohttp

from streamd.client import AuthError, ClientError, FeedError, Gap, Item, StreamClient, create_post

DEFAULT_URL = "http://127.0.0.1:8080"
# A post tagged with events reaches several of the tailed feeds: it prints
# once. Remembering this many recent ids bounds the memory of that.
SEEN_IDS = 4096

# Posts are written by anyone: control characters (ESC starts terminal escape
# sequences) and bidi overrides (which reorder what is shown) are printed as
# escapes, never passed to the terminal.
_UNSAFE = (
    {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
    | {c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
    | {0x09: " "}
)


def _safe(text: str) -> str:
    return text.translate(_UNSAFE)


def format_item(item: Item | Gap) -> str:
    """How `streamd tail` shows an item: `HH:MM:SS @author text #event ...`.

    The time is the post's `created_at` in local time. Continuation lines of
    the text and one line per media attachment are indented under the text.
    """
    if isinstance(item, Gap):
        return f"-- {_safe(item.feed)}: some items were lost here (trimmed, or the feed's history was reset)"
    if item.op == "delete":
        return f"-- deleted {_safe(item.post_id or '?')}"
    post = item.post or {}
    created = post.get("created_at")
    when = time.strftime("%H:%M:%S", time.localtime(created / 1000)) if isinstance(created, int) else "--:--:--"
    indent = " " * (len(when) + 1)
    lines = str(post.get("text", "")).splitlines() or [""]
    out = [f"{when} @{post.get('author', '?')} {lines[0]}", *(indent + line for line in lines[1:])]
    tags = " ".join(f"#{event}" for event in _strings(post.get("events")))
    if tags:
        out[-1] += "  " + tags
    for media in post.get("media") or []:
        if isinstance(media, dict):
            out.append(f"{indent}[{media.get('type', '?')}] {media.get('url', '')}")
    return "\n".join(_safe(line) for line in out)


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


class Seen:
    """The last `size` (op, post id) pairs printed; older ones are forgotten."""

    def __init__(self, size: int = SEEN_IDS) -> None:
        self._size = size
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()

    def first(self, item: Item | Gap) -> bool:
        """Whether `item` is new here (a Gap always is)."""
        if isinstance(item, Gap) or item.post_id is None:
            return True
        key = (item.op, item.post_id)
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return True


async def tail(url: str, token: str | None, feeds: list[str], backlog: int) -> int:
    """Print `feeds` live until SIGINT or SIGTERM (exit 0) or a refusal (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch(url, token, feeds, backlog, sys.stdout, sys.stderr))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watch, stopped):
            task.cancel()
        await asyncio.wait({watch, stopped})
        for sig in signals:
            loop.remove_signal_handler(sig)
    if watch.cancelled():
        return 0
    try:
        return watch.result()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the
        # interpreter's final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _watch(url: str, token: str | None, feeds: list[str], backlog: int, out: TextIO, err: TextIO) -> int:
    def subscribed(feed: str, head: str) -> None:
        print(f"-- subscribed to {feed}", file=err, flush=True)

    def reconnecting(reason: str, delay: float) -> None:
        print(f"-- reconnecting in {delay:.1f} s ({_safe(reason)})", file=err, flush=True)

    seen = Seen()
    client = StreamClient(
        url, feeds, token=token, backlog=backlog, on_subscribed=subscribed, on_reconnect=reconnecting
    )
    async with client:
        while True:
            try:
                async for item in client:
                    if seen.first(item):
                        print(format_item(item), file=out, flush=True)
                return 1  # every feed was refused
            except FeedError as exc:
                print(f"streamd tail: {_safe(str(exc))}", file=err, flush=True)
            except ClientError as exc:
                what = "refused" if isinstance(exc, AuthError) else "error"
                print(f"streamd tail: {what}: {_safe(exc.code)}: {_safe(exc.message)}", file=err, flush=True)
                return 1


async def post(url: str, token: str | None, text: str, events: Iterable[str]) -> int:
    """Publish one post and print its id; a refusal goes to stderr with exit 1."""
    if not token:
        print("streamd post: a user token is needed: --token or STREAMD_TOKEN", file=sys.stderr)
        return 2
    try:
        created = await create_post(url, token, text, events=list(events))
    except ClientError as exc:
        print(f"streamd post: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"streamd post: cannot reach {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print(created.get("id"), flush=True)
    return 0
