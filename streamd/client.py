"""An async Python client for streamd: live items of many feeds over one socket.

    async with StreamClient("http://127.0.0.1:8080", ["user:alice", "event:derby-2026"]) as client:
        async for item in client:
            if isinstance(item, Gap):
                ...  # items of item.feed were lost before the ones that follow
            else:
                ...  # item.op is "post" (item.post) or "delete" (item.post_id)

`StreamClient` keeps the last cursor of each feed. Whenever the socket is lost
(closed with any code but 4001, refused, or silent past the heartbeat
deadline) it reconnects after a full-jitter exponential backoff and resumes
every feed from its last cursor, so the consumer sees each item once, in order
within its feed. Items whose cursor is not after the last one of their feed
are dropped, in case a server ever sends one twice.

The iterator reads the socket itself: no background task and no queue. A
consumer that stops reading leaves frames in aiohttp's bounded reader and the
kernel's buffers; past the server's outbound limit the server closes the
socket with 4008 and the client resumes from its cursors.

Exceptions, one root:

    ClientError          status (HTTP status, None on the socket), code, message
    ├── AuthError        HTTP 401, close 4001, a refused `auth`: retrying cannot help
    └── FeedError        the server refused or ended one subscription (`feed`)

A `FeedError` leaves the other feeds running: catch it and iterate again
(`client.feeds` says which remain; iteration ends when none do).

`create_post` is the one HTTP helper: POST /v1/posts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import WSMsgType

from streamd.cursors import decode
from streamd.errors import BadRequest

log = logging.getLogger("streamd.client")

# Server frames are one item each (a post is under 20 KiB at the default
# limits); anything near this size is a broken server, not data.
MAX_FRAME_BYTES = 1 << 20
MAX_RESPONSE_BYTES = 1 << 20
CLOSE_TIMEOUT = 2.0
AUTH_REF = "auth"
TOKEN_REVOKED = 4001
# Error codes after which the same subscribe may succeed on a new socket.
TRANSIENT_CODES = frozenset({"unavailable", "rate_limited"})
# Handshake statuses worth retrying; any other refusal is a wrong URL or a
# wrong token and would be refused again forever.
RETRY_STATUSES = frozenset({408, 425, 429})
MAX_BACKOFF_EXPONENT = 32  # 2**32 * base is past any sane cap; keeps floats finite


class ClientError(Exception):
    """The server said no: an HTTP error body, or an error on the socket."""

    def __init__(self, status: int | None, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AuthError(ClientError):
    """The token is unknown, revoked or expired: reconnecting would not help."""


class FeedError(ClientError):
    """The server refused a subscription or ended it (a deleted list, access lost)."""

    def __init__(self, feed: str, code: str, message: str) -> None:
        super().__init__(None, code, message)
        self.feed = feed

    def __str__(self) -> str:
        return f"{self.feed}: {self.code}: {self.message}"


@dataclass(frozen=True, slots=True)
class Item:
    """One entry of one feed: a `post` (with `post`) or a `delete` (with `post_id`).

    `post_id` is set for both: the id of the post shown or deleted.
    """

    feed: str
    op: str
    cursor: str
    post: dict[str, Any] | None
    post_id: str | None


@dataclass(frozen=True, slots=True)
class Gap:
    """Items of `feed` were lost here (trimmed, or its history was reset).

    Yielded in place: items before it came before the loss, items after it after.
    """

    feed: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The server confirmed a subscription; `cursor` is the feed's head then."""

    feed: str
    cursor: str
    gap: bool


class Reconnect(Exception):
    """An error frame that a fresh socket may not get: drop this one and resume."""


# -- the pure core ----------------------------------------------------------------


def is_after(cursor: str, last: str | None) -> bool:
    """Whether an item at `cursor` comes after `last` in the same feed.

    A cursor of another epoch names a new history of the feed: it is accepted,
    since its entries cannot be compared with the old ones.
    """
    if last is None:
        return True
    try:
        new, old = decode(cursor), decode(last)
    except BadRequest:
        return cursor != last  # not ours to parse: drop only an exact repeat
    return new.epoch != old.epoch or new.entry > old.entry


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)).

    Spreads the clients of a restarting gateway (all closed with 1001 at once)
    instead of bringing them back in step.
    """
    return rand() * min(cap, base * 2.0 ** min(attempt, MAX_BACKOFF_EXPONENT))


class Subscriptions:
    """Which feeds are read, where each resumes, and what was delivered. Sans I/O.

    Two cursors per feed: `floor`, the last item handed to the consumer (items
    at or before it are duplicates), and `resume`, where a new socket starts.
    They differ only after a subscribe by `backlog`: the server's head becomes
    the resume point at once, so a reconnect never skips live items, while the
    backlog items, older than that head, are still delivered.
    """

    def __init__(self, feeds: Iterable[str], cursors: dict[str, str] | None = None, backlog: int = 0) -> None:
        self.resume: dict[str, str | None] = dict.fromkeys(feeds)
        if not self.resume:
            raise ValueError("StreamClient needs at least one feed")
        unknown = (cursors or {}).keys() - self.resume.keys()
        if unknown:
            raise ValueError(f"cursors for feeds not subscribed: {', '.join(sorted(unknown))}")
        self.resume.update(cursors or {})
        self.floor: dict[str, str | None] = dict(self.resume)
        self.backlog = backlog

    @property
    def feeds(self) -> list[str]:
        return list(self.resume)

    def requests(self, token: str | None) -> list[dict[str, Any]]:
        """The frames that open a new socket: auth, then one subscribe per feed."""
        frames: list[dict[str, Any]] = []
        if token is not None:
            frames.append({"op": "auth", "ref": AUTH_REF, "token": token})
        for feed, cursor in self.resume.items():
            self.floor[feed] = cursor
            if cursor is not None:
                frames.append({"op": "subscribe", "feed": feed, "cursor": cursor})
            elif self.backlog:
                frames.append({"op": "subscribe", "feed": feed, "backlog": self.backlog})
            else:
                frames.append({"op": "subscribe", "feed": feed})
        return frames

    def on_frame(self, frame: Any) -> Item | Subscribed | None:
        """What one server frame means to the consumer; None if nothing.

        Raises `AuthError` or `FeedError` for refusals, `Reconnect` for errors
        a new socket may not get.
        """
        if not isinstance(frame, dict):
            return None
        op = frame.get("op")
        feed = frame.get("feed")
        if op in ("post", "delete"):
            return self._item(frame, op, feed)
        if op == "subscribed" and feed in self.resume:
            cursor = str(frame.get("cursor"))
            if self.resume[feed] is None:
                self.resume[feed] = cursor
            return Subscribed(feed, cursor, frame.get("gap") is True)
        if op == "error":
            self._error(frame, feed)
        return None  # ok, pong, heartbeat, unsubscribed, and ops of later versions

    def _item(self, frame: dict[str, Any], op: str, feed: Any) -> Item | None:
        cursor = frame.get("cursor")
        if feed not in self.resume or not isinstance(cursor, str):
            return None  # a feed dropped after an error; its last frames are moot
        if not is_after(cursor, self.floor[feed]):
            return None
        self.floor[feed] = self.resume[feed] = cursor
        post = frame.get("post") if op == "post" else None
        if post is not None and not isinstance(post, dict):
            post = None
        post_id = post.get("id") if post is not None else frame.get("post_id")
        return Item(feed, op, cursor, post, post_id if isinstance(post_id, str) else None)

    def _error(self, frame: dict[str, Any], feed: Any) -> None:
        code = str(frame.get("code", "unknown"))
        message = str(frame.get("message", ""))
        if code in TRANSIENT_CODES:
            raise Reconnect(f"{feed or 'server'}: {code}: {message}")
        if isinstance(feed, str) and feed in self.resume:
            del self.resume[feed]
            del self.floor[feed]
            raise FeedError(feed, code, message)
        if frame.get("ref") == AUTH_REF or code == "unauthorized":
            raise AuthError(None, code, message)
        raise ClientError(None, code, message)


# -- the socket ---------------------------------------------------------------------


def _ws_url(url: str) -> str:
    return url.rstrip("/") + "/v1/ws"


class StreamClient:
    """Live items of `feeds` from the gateway at `url` (http base URL), resumed across reconnects.

    `cursors` resumes feeds from where an earlier client stopped (see
    `.cursors`); feeds without one start with the last `backlog` items, then
    live. The socket is opened on the first iteration.

    `on_subscribed(feed, head)` runs whenever the server confirms a feed (on
    every connection); `on_reconnect(reason, delay)` when the socket was lost
    or could not be opened, before waiting `delay` seconds to try again. Both
    run inside the iteration, in order with the items.

    A socket that sends no frame for `2 * heartbeat_seconds` (the server sends
    one after that long quiet) is taken for dead.
    """

    def __init__(
        self,
        url: str,
        feeds: Iterable[str],
        *,
        token: str | None = None,
        cursors: dict[str, str] | None = None,
        backlog: int = 0,
        heartbeat_seconds: float = 25.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        connect_timeout: float = 10.0,
        on_subscribed: Callable[[str, str], None] | None = None,
        on_reconnect: Callable[[str, float], None] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url
        self._subs = Subscriptions(feeds, cursors, backlog)
        self._token = token
        self._deadline = 2 * heartbeat_seconds
        self._backoff = (backoff_base, backoff_cap)
        self._connect_timeout = connect_timeout
        self._on_subscribed = on_subscribed
        self._on_reconnect = on_reconnect
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._attempt = 0  # failures since the last confirmed subscription
        self._closed = False

    @property
    def feeds(self) -> list[str]:
        """The feeds still read (a `FeedError` removes one)."""
        return self._subs.feeds

    @property
    def cursors(self) -> dict[str, str]:
        """Where each feed would resume: pass to a later client's `cursors`."""
        return {feed: cursor for feed, cursor in self._subs.resume.items() if cursor is not None}

    async def __aenter__(self) -> StreamClient:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop_socket()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def __aiter__(self) -> StreamClient:
        return self

    async def __anext__(self) -> Item | Gap:
        while not self._closed and self._subs.feeds:
            ws = self._ws or await self._connect()
            try:
                msg = await ws.receive(timeout=self._deadline)
            except TimeoutError:
                await self._lost(f"no frame for {self._deadline:g} s")
                continue
            if msg.type is WSMsgType.TEXT:
                out = await self._on_text(msg.data)
                if out is not None:
                    return out
            elif msg.type is not WSMsgType.BINARY:  # the server never sends binary frames
                # A CLOSE carries the server's code; ws.close_code can already be
                # 1006 if the server dropped the TCP connection before our reply.
                code = msg.data if msg.type is WSMsgType.CLOSE else ws.close_code
                reason = f"closed {code}" + (f" ({msg.extra})" if msg.extra else "")
                if code == TOKEN_REVOKED:
                    await self.aclose()
                    raise AuthError(None, "unauthorized", msg.extra or "the token was revoked or expired")
                await self._lost(reason)
        raise StopAsyncIteration

    async def _on_text(self, data: str) -> Item | Gap | None:
        try:
            event = self._subs.on_frame(orjson.loads(data))
        except orjson.JSONDecodeError:
            log.debug("ignoring a frame that is not JSON")
            return None
        except Reconnect as err:
            await self._lost(str(err))
            return None
        except AuthError:
            await self.aclose()
            raise
        if isinstance(event, Subscribed):
            self._attempt = 0
            if self._on_subscribed is not None:
                self._on_subscribed(event.feed, event.cursor)
            return Gap(event.feed) if event.gap else None
        return event

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        """Open a socket and send auth and the subscribes; retry until one opens."""
        assert self._session is not None, "use StreamClient in `async with`"
        while True:
            ws: aiohttp.ClientWebSocketResponse | None = None
            try:
                async with asyncio.timeout(self._connect_timeout):
                    ws = await self._session.ws_connect(
                        _ws_url(self.url),
                        autoping=True,
                        max_msg_size=MAX_FRAME_BYTES,
                        timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT),
                    )
                    for frame in self._subs.requests(self._token):
                        await ws.send_str(orjson.dumps(frame).decode())
                self._ws = ws
                return ws
            except aiohttp.WSServerHandshakeError as err:
                if err.status == 401:
                    raise AuthError(401, "unauthorized", "the gateway refused the token") from err
                if 400 <= err.status < 500 and err.status not in RETRY_STATUSES:
                    raise ClientError(err.status, "handshake", f"{_ws_url(self.url)}: {err.message}") from err
                reason = f"HTTP {err.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                reason = str(err) or type(err).__name__
            except BaseException:
                if ws is not None:
                    await _close_quietly(ws)
                raise
            if ws is not None:
                await _close_quietly(ws)
            await self._pause(reason)

    async def _lost(self, reason: str) -> None:
        await self._drop_socket()
        await self._pause(reason)

    async def _pause(self, reason: str) -> None:
        delay = backoff_delay(self._attempt, *self._backoff)
        self._attempt += 1
        log.debug("reconnecting in %.2f s: %s", delay, reason)
        if self._on_reconnect is not None:
            self._on_reconnect(reason, delay)
        await asyncio.sleep(delay)

    async def _drop_socket(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await _close_quietly(ws)


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse) -> None:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, RuntimeError):
        await ws.close()


# -- HTTP ---------------------------------------------------------------------------


async def create_post(
    url: str,
    token: str,
    text: str,
    events: Iterable[str] | None = None,
    media: Iterable[dict[str, str]] | None = None,
    idempotency_key: str | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """POST /v1/posts; the accepted post. Raises `ClientError` on an error answer.

    Transport failures (refused, timed out) are aiohttp's and the builtins' own.
    """
    body: dict[str, Any] = {"text": text}
    if events:
        body["events"] = list(events)
    if media:
        body["media"] = list(media)
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(aiohttp.ClientSession())
        request = session.post(
            url.rstrip("/") + "/v1/posts",
            data=orjson.dumps(body),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        )
        async with request as resp:
            raw = await _read_limited(resp)
            status = resp.status
    answer = _json_or_none(raw)
    if status == 201 and isinstance(answer, dict) and isinstance(answer.get("post"), dict):
        post: dict[str, Any] = answer["post"]
        return post
    raise error_from(status, answer)


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ClientError(resp.status, "too_large", f"response over {MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def error_from(status: int, body: Any) -> ClientError:
    """The exception for an HTTP error answer (`{"error": {"code", "message"}}`)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = str(error.get("code", "http_error")), str(error.get("message", ""))
    else:
        code, message = "http_error", f"unexpected answer (HTTP {status})"
    cls = AuthError if status == 401 else ClientError
    return cls(status, code, message)
