"""The WebSocket endpoint `/v1/ws`: one socket, many feed subscriptions.

aiohttp answers the upgrade; the socket is then handed to a `WebSocket`
(streamd.wssocket), which reads its frames with no task of its own and gives
each text message to the socket's `Session`. An op that awaits (auth, a
subscribe and its replay from history) runs as a short task; live items reach
the socket through the hub.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from redis.exceptions import RedisError

from streamd import cursors, history
from streamd.access import can_read
from streamd.auth import Auth, Principal
from streamd.cursors import Handoff
from streamd.errors import CloseCode, NotFound, RateLimited, StreamdError, TooManySubscriptions, Unavailable
from streamd.feeds import parse_feed
from streamd.http_base import token_of
from streamd.hub import Connection, Hub
from streamd.lists import Lists
from streamd.protocol import (
    ClientOp,
    error_frame,
    ok_frame,
    parse_client_frame,
    pong_frame,
    subscribed_frame,
    unsubscribed_frame,
)
from streamd.ratelimit import Bucket, KeyedLimiter
from streamd.settings import Settings
from streamd.store import TRANSIENT_ERRORS
from streamd.wssocket import WebSocket

log = logging.getLogger("streamd.gateway")

REPLAY_DRAIN_SECONDS = 30.0


class Session:
    """The request side of one socket: parses ops and answers them."""

    __slots__ = ("hub", "auth", "lists", "settings", "conn", "principal", "malformed", "frames")

    def __init__(self, hub: Hub, auth: Auth, lists: Lists, settings: Settings, conn: Connection) -> None:
        self.hub = hub
        self.auth = auth
        self.lists = lists
        self.settings = settings
        self.conn = conn
        self.principal: Principal | None = None
        self.malformed = 0
        self.frames = Bucket.full(settings.frames_per_second, settings.frames_burst, time.monotonic())

    def within_rate(self, now: float) -> bool:
        if self.frames.take(now):
            return True
        self.hub.kill(self.conn, CloseCode.RATE_LIMITED, "too many frames; slow down")
        return False

    def receive(self, text: str) -> ClientOp | None:
        """The op of one text frame, or None when the frame was malformed (and answered so)."""
        try:
            return parse_client_frame(text, max_backlog=self.settings.max_backlog)
        except StreamdError as err:
            self.malformed += 1
            self.hub.send(self.conn, error_frame(err))
            if self.malformed >= self.settings.max_malformed_frames:
                self.hub.kill(self.conn, CloseCode.POLICY_VIOLATION, "too many malformed frames")
            return None

    def answer_now(self, op: ClientOp) -> bool:
        """Answer `op` if that needs no waiting (ping, unsubscribe); False: `run` it."""
        if op.op == "ping":
            self.hub.send(self.conn, pong_frame(op.ref))
        elif op.op == "unsubscribe":
            assert op.feed is not None
            self.hub.detach(op.feed, self.conn)
            self.hub.send(self.conn, unsubscribed_frame(op.ref, op.feed))
        else:
            return False
        return True

    async def handle_text(self, text: str) -> None:
        op = self.receive(text)
        if op is not None and not self.answer_now(op):
            await self.run(op)

    async def run(self, op: ClientOp) -> None:
        """Answer `op`; its errors become error frames."""
        try:
            await self.dispatch(op)
        except StreamdError as err:
            self._answer(op, err)
        except (RedisError, *TRANSIENT_ERRORS) as err:
            log.warning("redis unavailable during %s: %r", op.op, err)
            self._answer(op, Unavailable("storage is unavailable, try again"))

    def _answer(self, op: ClientOp, err: StreamdError) -> None:
        err.ref = op.ref
        if err.feed is None and op.feed is not None:
            err.feed = op.feed
        self.hub.send(self.conn, error_frame(err))

    async def dispatch(self, op: ClientOp) -> None:
        if self.answer_now(op):
            return
        if op.op == "auth":
            assert op.token is not None
            self.principal = await self.auth.principal(op.token)
            self.conn.principal = self.principal
            self.hub.send(self.conn, ok_frame(op.ref))
        elif op.op == "subscribe":
            await self.subscribe(op)

    async def subscribe(self, op: ClientOp, start: cursors.Cursor | None = None) -> None:
        """`start`: where a subscribe without a cursor begins instead of the
        feed's head when it is read (the items after it are sent)."""
        feed = op.feed
        assert feed is not None
        await self.lists.check_feed_readable(self.principal, feed)
        hub, conn = self.hub, self.conn
        if hub.is_subscribed(feed, conn):
            snap = await hub.histories.snapshot(feed, 1)
            hub.send(conn, subscribed_frame(op.ref, feed, snap.head_cursor(), False))
            return
        if len(conn.feeds) >= self.settings.max_subscriptions:
            raise TooManySubscriptions(f"at most {self.settings.max_subscriptions} subscriptions per socket")
        cursor = cursors.decode(op.cursor) if op.cursor is not None else start
        handoff = Handoff()
        await hub.attach(feed, conn, handoff)
        try:
            await self._replay(op, feed, cursor, handoff)
        except BaseException:
            hub.detach(feed, conn)
            raise
        hub.go_live(feed, conn)

    async def _replay(self, op: ClientOp, feed: str, cursor: cursors.Cursor | None, handoff: Handoff) -> None:
        hub, conn = self.hub, self.conn
        histories = hub.histories
        snap = await histories.snapshot(feed, op.backlog if cursor is None else 1)
        head = snap.head
        handoff.epoch = snap.epoch
        if cursor is None:
            hub.send(conn, subscribed_frame(op.ref, feed, snap.head_cursor(), False))
            for entry in reversed(snap.newest[: op.backlog]):
                handoff.replayed(cursors.parse_entry_id(entry[0]))
                hub.send(conn, history.item_frame(feed, snap.epoch, entry))
            handoff.replayed(head)
            return
        plan = cursors.plan_resume(cursor, snap.epoch, snap.trimmed)
        if op.cursor is not None:
            hub.metrics.replays.inc()
        if plan.gap:
            hub.metrics.gaps.inc()
        hub.send(conn, subscribed_frame(op.ref, feed, snap.head_cursor(), plan.gap))
        after = plan.after
        page = self.settings.replay_page
        while after < head:
            entries = await histories.read_after(feed, after, page)
            for entry in entries:
                entry_id = cursors.parse_entry_id(entry[0])
                if entry_id > head:
                    break  # newer items arrive live (they are held in the handoff)
                handoff.replayed(entry_id)
                hub.send(conn, history.item_frame(feed, snap.epoch, entry))
                after = entry_id
                if conn.pending_bytes > self.settings.socket_buffer_bytes // 4:
                    # A page can be larger than the socket's bound: write as we go.
                    await self._drain()
            else:
                if len(entries) == page:
                    await self._drain()
                    continue
            break
        handoff.replayed(head)

    async def _drain(self) -> None:
        """Between replay pages: write what is queued and wait for the socket to take it."""
        await self.hub.drain([self.conn], REPLAY_DRAIN_SECONDS)


def client_ip(request: web.Request, settings: Settings) -> str:
    """The client's address: the peer's, or behind trusted proxies the
    X-Forwarded-For entry the first of them appended (`forwarded_for_hops`
    from the end; any entry before it the client may have written). A
    header with fewer entries did not come through every proxy: the peer's."""
    if settings.trust_forwarded_for:
        hops = max(1, settings.forwarded_for_hops)
        entries = [e.strip() for e in ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")]
        entries = [e for e in entries if e]
        if len(entries) >= hops:
            return entries[-hops]
    return request.remote or "?"


class Upgrade(web.StreamResponse):
    """The `101 Switching Protocols` answer. aiohttp writes it; after it the
    connection is no longer aiohttp's, so nothing is written at its end."""

    def __init__(self, accept: str) -> None:
        super().__init__(
            status=101,
            headers={hdrs.UPGRADE: "websocket", hdrs.CONNECTION: "upgrade", hdrs.SEC_WEBSOCKET_ACCEPT: accept},
        )
        self.force_close()

    async def write_eof(self, data: bytes = b"") -> None:
        pass


def accept_key(request: web.Request) -> str:
    """Check the opening handshake (RFC 6455 section 4.2.1); the Sec-WebSocket-Accept value."""
    headers = request.headers
    if headers.get(hdrs.UPGRADE, "").strip().lower() != "websocket":
        raise web.HTTPBadRequest(text="not a WebSocket upgrade: Upgrade: websocket is missing")
    if "upgrade" not in (token.strip().lower() for token in headers.get(hdrs.CONNECTION, "").split(",")):
        raise web.HTTPBadRequest(text="not a WebSocket upgrade: Connection: Upgrade is missing")
    if headers.get(hdrs.SEC_WEBSOCKET_VERSION, "").strip() != "13":
        raise web.HTTPBadRequest(text="unsupported WebSocket version", headers={hdrs.SEC_WEBSOCKET_VERSION: "13"})
    key = headers.get(hdrs.SEC_WEBSOCKET_KEY, "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        valid = False
    if not valid:
        raise web.HTTPBadRequest(text="bad Sec-WebSocket-Key")
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def websocket_handler(
    request: web.Request, hub: Hub, auth: Auth, lists: Lists, limiter: KeyedLimiter, settings: Settings
) -> web.StreamResponse:
    if not limiter.allow(client_ip(request, settings), time.monotonic()):
        raise RateLimited("too many new connections from this address; retry shortly")
    token = token_of(request)
    principal = await auth.principal(token) if token is not None else None  # Unauthorized: HTTP 401

    response = Upgrade(accept_key(request))
    try:
        await response.prepare(request)
    except ConnectionError:
        return response  # the client left during the upgrade
    transport = request.transport
    if transport is None or transport.is_closing():
        return response
    ws = WebSocket(hub, transport, settings.max_frame_bytes, hub.now())
    session = Session(hub, auth, lists, settings, ws)
    session.principal = principal
    ws.session = session
    ws.principal = principal
    early = _hand_over(request, ws)
    hub.add(ws)
    ws.start(early)
    # The handler ends here; the socket lives on in `ws` and the hub.
    return response


def _hand_over(request: web.Request, ws: WebSocket) -> bytes:
    """Give the socket's transport to `ws` and make aiohttp forget the connection;
    the bytes the client sent right behind its upgrade request.

    aiohttp's request handler would otherwise close the transport when this
    request's handler returns: it is told the connection is gone (with no
    transport left to close), which also drops it from the server's list of
    connections and frees its parser, request and task."""
    handler = request.protocol
    transport = request.transport
    assert transport is not None
    # Only the upgrade request was parsed: anything behind it waits here.
    early: bytes = getattr(handler, "_message_tail", b"")
    transport.set_protocol(ws)
    handler.transport = None
    handler.connection_lost(None)
    return early


def make_recheck(hub: Hub, lists: Lists) -> Callable[[str, list[Connection]], Awaitable[None]]:
    """What the hub runs when a feed's access changed: evict who may no longer read it."""

    async def recheck(feed: str, conns: list[Connection]) -> None:
        record = await lists.record(parse_feed(feed).name)
        denied = [c for c in conns if not can_read(c.principal, parse_feed(feed), record)]
        if denied:
            hub.evict(feed, denied, error_frame(NotFound("no such list", feed=feed)))

    return recheck
