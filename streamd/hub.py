"""The hub: which local sockets read which feed, and the write path to them.

Delivery is synchronous and allocation-light: a live item is encoded once per
kind of reader (a WebSocket frame, an SSE chunk), its bytes are appended to
each subscriber's pending list, and one flush per loop iteration joins each
connection's pending frames into a single write to its socket. No task and no
await per recipient. A connection whose pending data or transport buffer
passes `socket_buffer_bytes` is closed with 4008 and never slows the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING

import orjson

from streamd import cursors, history, keys
from streamd.auth import Principal
from streamd.cursors import EntryId, Handoff
from streamd.errors import CloseCode, Unavailable
from streamd.feeds import KINDS
from streamd.history import Histories
from streamd.live import LiveChannels
from streamd.metrics import Metrics
from streamd.protocol import heartbeat_frame
from streamd.settings import Settings
from streamd.sse import sse_chunk
from streamd.store import TRANSIENT_ERRORS, AnyRedis
from streamd.wsframe import PING_FRAME, text_frame

if TYPE_CHECKING:
    from streamd.wssocket import WebSocket

log = logging.getLogger("streamd.hub")


Encoder = Callable[[bytes], bytes]

# Transports whose bytes go to their socket as they are: the only ones a
# frame may be written past, straight to the socket (never a TLS transport,
# whose socket carries records).
_PLAIN_TRANSPORTS = frozenset({"TCPTransport", "_SelectorSocketTransport"})

_POST_ID = b'"post":{"id":"'
_CURSOR = b'"cursor":"'
# How long a resubscribed feed's refill waits for a reader to take a page of
# history before closing it 4008: the feed's live items are held meanwhile.
RESYNC_DRAIN_SECONDS = 5.0
RESYNC_ATTEMPTS = 5
# Passes a refill may read the history again (its held live items passed the
# socket bound and were let go, or the live stream broke again) before it
# closes the feed's readers to resume from their cursors. Each pass reads what
# came live during the one before, so passes shrink while the readers take
# items faster than the feed gets them; one that gets them faster never ends.
RESYNC_PASSES = 5
# The live items the refilling feeds of a process may hold, in socket bounds
# (`socket_buffer_bytes`): the feed being refilled holds up to one bound, and
# the feeds waiting for their turn share this many more. Past it a waiting
# feed lets its items go, to read them from its history when its turn comes.
WAITING_BOUNDS = 15


def _created_at(payload: bytes) -> int | None:
    """The created_at (ms) of a live `post` item: the ms part of the post's id,
    which the frame carries first in the post. None for other items."""
    start = payload.find(_POST_ID) + len(_POST_ID)
    end = payload.find(b"-", start)
    ms = payload[start:end]
    return int(ms) if start >= len(_POST_ID) and ms.isdigit() else None


def _epoch_of(payload: bytes) -> str | None:
    """The history epoch in a live item's cursor (the first cursor of the frame)."""
    start = payload.find(_CURSOR) + len(_CURSOR)
    end = payload.find(b".", start)
    return payload[start:end].decode() if start >= len(_CURSOR) and end > start else None


class Connection:
    """One reader's delivery state: an SSE response, or the base of a
    WebSocket (streamd.wssocket, whose `ws` is itself). Small on purpose:
    there are many."""

    __slots__ = (
        "transport",
        "fd",
        "encode",
        "pending",
        "pending_bytes",
        "dirty",
        "closed",
        "last_write",
        "feeds",
        "principal",
        "done",
        "__weakref__",
    )

    ws: WebSocket | None = None

    def __init__(self, ws: None, transport: asyncio.Transport, encode: Encoder = text_frame) -> None:
        assert ws is None  # a WebSocket is a subclass
        self.transport = transport
        self.fd = socket_fd(transport)
        self.encode = encode  # protocol message -> bytes on the wire
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.dirty = False
        self.closed = False
        self.last_write = 0.0
        self.feeds: set[str] = set()
        self.principal: Principal | None = None
        # Resolved when the hub drops the connection; only SSE handlers wait on it.
        self.done: asyncio.Future[None] | None = None


def socket_fd(transport: asyncio.BaseTransport) -> int:
    """The socket a frame can be written to directly, past `transport`; -1 if none.

    Only a plain TCP transport qualifies: under TLS the socket carries the
    transport's records, and any other transport may keep bytes of its own."""
    if type(transport).__name__ not in _PLAIN_TRANSPORTS or transport.get_extra_info("ssl_object") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


class FeedState:
    __slots__ = ("feed", "channel", "live", "sse", "syncing", "filters", "last", "epoch", "resync", "again", "ready")

    def __init__(self, feed: str, channel: bytes) -> None:
        self.feed = feed
        self.channel = channel
        self.live: dict[Connection, None] = {}  # WebSockets; a dict is an ordered set
        self.sse: dict[Connection, None] = {}  # SSE readers
        self.syncing: dict[Connection, Handoff] = {}
        # A socket that just went live after replaying up to entry E may still
        # see older live messages that were in flight from Redis: skip those
        # until the live stream passes E.
        self.filters: dict[Connection, EntryId] = {}
        self.last: EntryId = cursors.ZERO  # newest entry received live
        # The history epoch of the items the readers have (None: not known yet):
        # a refill from a history of another epoch cannot follow them.
        self.epoch: str | None = None
        self.resync: Handoff | None = None  # set while refilling after a reconnect
        self.again = False  # the live stream broke again during the refill: read once more
        self.ready: asyncio.Future[None] | None = None


class Hub:
    def __init__(
        self, client: AnyRedis, settings: Settings, metrics: Metrics | None = None, histories: Histories | None = None
    ) -> None:
        self.redis = client
        self.histories = histories if histories is not None else Histories(client)
        self.metrics = metrics if metrics is not None else Metrics()
        self._settings = settings
        self._limit = settings.socket_buffer_bytes
        self._held = 0  # bytes of live items held by the feeds waiting to be refilled
        self._refilled: FeedState | None = None  # the feed being refilled (one at a time)
        self._by_channel: dict[bytes, FeedState] = {}
        self._by_feed: dict[str, FeedState] = {}
        self.connections: set[Connection] = set()
        self._dirty: list[Connection] = []
        self._flush_handle: asyncio.Handle | None = None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future[None]] = set()  # background work
        self._closing: dict[Connection, asyncio.Future[None]] = {}  # sockets being closed
        self.live = LiveChannels(client, self._on_message, self._resync_all, self.metrics)
        self._refilling = asyncio.Lock()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._control = keys.CONTROL_CHANNEL.encode()
        # Set by the gateway: re-checks who may still read a feed whose access
        # changed (a list made private).
        self.recheck: Callable[[str, list[Connection]], Awaitable[None]] | None = None
        self.slow_closes = 0
        self.delivered = 0  # items queued to readers live, and their bytes
        self.delivered_bytes = 0
        self._exported = (0, 0)  # of those, what the exported counters hold
        self._posted: list[int] = []  # created_at of live posts queued since the last flush

    async def __aenter__(self) -> Hub:
        await self.live.__aenter__()
        self._keep(asyncio.ensure_future(self.live.subscribe(self._control)))
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name="streamd-heartbeats")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        await self.live.__aexit__(*exc)
        for task in self._tasks:
            task.cancel()
        pending = self._tasks | set(self._closing.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -- subscriptions -------------------------------------------------------

    def feed_count(self) -> int:
        return len(self._by_feed)

    async def attach(self, feed: str, conn: Connection, handoff: Handoff) -> None:
        """Register `conn` as syncing on `feed` (live items are held in `handoff`)
        and wait until the process's Redis subscription to the feed is live."""
        if not self.live.connected.is_set():
            # Redis is away (or the process just started): answer soon, not after 10 s.
            try:
                await asyncio.wait_for(self.live.connected.wait(), timeout=2)
            except TimeoutError:
                raise Unavailable("live channel to Redis is down, try again", feed=feed) from None
        st = self._by_feed.get(feed)
        if st is None:
            channel = keys.feed_channel(feed).encode()
            st = FeedState(feed, channel)
            self._by_feed[feed] = st
            self._by_channel[channel] = st
            st.ready = asyncio.ensure_future(self.live.subscribe(channel))
        st.syncing[conn] = handoff
        conn.feeds.add(feed)
        assert st.ready is not None
        try:
            await asyncio.wait_for(asyncio.shield(st.ready), timeout=10)
        except (TimeoutError, asyncio.CancelledError):
            self.detach(feed, conn)
            raise
        except Exception as err:
            self.detach(feed, conn)
            raise Unavailable("live subscription failed, try again", feed=feed) from err

    def go_live(self, feed: str, conn: Connection) -> None:
        """End the replay: release the held items after the replayed ones, then live."""
        st = self._by_feed.get(feed)
        if st is None or conn.closed:
            return
        handoff = st.syncing.pop(conn, None)
        if handoff is None:
            return
        for payload in handoff.release():
            self.send(conn, payload)
        if st.epoch is None:
            st.epoch = handoff.epoch
        if handoff.last > st.last:
            st.filters[conn] = handoff.last
        (st.live if conn.ws is not None else st.sse)[conn] = None

    def detach(self, feed: str, conn: Connection) -> None:
        conn.feeds.discard(feed)
        st = self._by_feed.get(feed)
        if st is None:
            return
        st.live.pop(conn, None)
        st.sse.pop(conn, None)
        st.syncing.pop(conn, None)
        st.filters.pop(conn, None)
        if not st.live and not st.sse and not st.syncing:
            del self._by_feed[feed]
            del self._by_channel[st.channel]
            if st.ready is not None and not st.ready.done():
                st.ready.cancel()
            self._keep(asyncio.ensure_future(self.live.unsubscribe(st.channel)))

    def is_subscribed(self, feed: str, conn: Connection) -> bool:
        return feed in conn.feeds

    # -- delivery ------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        st = self._by_channel.get(channel)
        if st is None:
            if channel == self._control:
                self._on_control(data)
            return
        if data[:1] == b"!":
            self._on_feed_control(st, data)
            return
        space = data.find(b" ")
        raw_id = data[:space]
        ms, _, seq = raw_id.partition(b"-")
        entry = (int(ms), int(seq))
        payload = data[space + 1 :]
        if st.resync is not None:
            # Held within one socket's bound: the items go to sockets of that
            # bound. Past it they are let go: the feed script publishes each
            # item right after its XADD, so the refill finds them in the
            # history, after `resync.last`, when it reads it once more.
            resync = st.resync
            if st is self._refilled:
                dropped = resync.hold_within(entry, payload, self._limit)
            else:
                before = resync.held_bytes
                room = WAITING_BOUNDS * self._limit - (self._held - before)  # what the other waiting feeds leave
                dropped = resync.hold_within(entry, payload, min(self._limit, room))
                self._held += resync.held_bytes - before
            if dropped:
                st.again = True
                self.metrics.refill_dropped.inc(dropped)
        elif entry > st.last:
            st.last = entry
            if st.epoch is None:
                st.epoch = _epoch_of(payload)
            self._deliver(st, entry, payload)

    def _on_feed_control(self, st: FeedState, data: bytes) -> None:
        conns = [*st.live, *st.sse, *st.syncing]
        if data == b"!acl":
            if self.recheck is not None and conns:
                self._keep(asyncio.ensure_future(self.recheck(st.feed, conns)))
        elif data.startswith(b"! "):
            # The feed is gone (a deleted list): tell its readers, then drop them.
            self.evict(st.feed, conns, data[2:])

    def evict(self, feed: str, conns: list[Connection], payload: bytes) -> None:
        """Send `payload` (an error) to `conns` and unsubscribe them from `feed`."""
        for conn in conns:
            self.detach(feed, conn)
            self.send(conn, payload)
            if conn.ws is None:
                self.kill(conn, CloseCode.GOING_AWAY)  # an SSE stream reads one feed: it ends

    def _on_control(self, data: bytes) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("ignoring a malformed control message")
            return
        revoked = message.get("revoked") if isinstance(message, dict) else None
        if revoked:
            for conn in list(self.connections):
                if conn.principal is not None and conn.principal.token_id == revoked:
                    self.kill(conn, CloseCode.TOKEN_REVOKED, "the token was revoked")

    def _keep(self, task: asyncio.Future[None]) -> None:
        """Hold a reference to a background task until it ends."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _deliver(self, st: FeedState, entry: EntryId, payload: bytes) -> None:
        if st.syncing:
            for conn, handoff in list(st.syncing.items()):
                handoff.hold(entry, payload)
                if handoff.held_bytes > self._limit:
                    self.kill(conn, CloseCode.TOO_SLOW)
        if st.live:
            self._fan_out(st, st.live, entry, text_frame(payload))
        if st.sse:
            self._fan_out(st, st.sse, entry, sse_chunk(payload))
        if (st.live or st.sse) and self._flush_handle is not None:
            created = _created_at(payload)
            if created is not None:  # timed once per message, at the flush that writes it
                self._posted.append(created)

    def _fan_out(self, st: FeedState, readers: dict[Connection, None], entry: EntryId, frame: bytes) -> None:
        """The hot path: the same bytes appended to every reader's pending list."""
        n = len(frame)
        limit = self._limit
        dirty = self._dirty
        filters = st.filters
        over = False
        skipped = 0
        if filters:
            # Readers that went live after replaying past `entry` already have it.
            for conn in [c for c in filters if c in readers]:
                if entry <= filters[conn]:
                    skipped += 1
                else:
                    del filters[conn]
        for conn in readers:
            if skipped and conn in filters and entry <= filters[conn]:
                continue
            conn.pending.append(frame)
            conn.pending_bytes += n
            if conn.pending_bytes > limit:
                over = True
            if not conn.dirty:
                conn.dirty = True
                dirty.append(conn)
        sent = len(readers) - skipped
        # Counted here, added to the exported counters when they are scraped.
        self.delivered += sent
        self.delivered_bytes += n * sent
        if dirty and self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        if over:  # after the loop: killing changes `readers`
            for conn in [c for c in readers if c.pending_bytes > limit]:
                self.kill(conn, CloseCode.TOO_SLOW)

    def send(self, conn: Connection, payload: bytes) -> None:
        """Queue one protocol message for `conn`, encoded for it; written on the next flush."""
        if conn.closed:
            return
        frame = conn.encode(payload)
        if not frame:
            return  # nothing to say on this kind of connection
        self._queue(conn, frame)

    def _queue(self, conn: Connection, frame: bytes) -> None:
        """Queue bytes for the wire as they are; written on the next flush."""
        if conn.closed:
            return
        conn.pending.append(frame)
        conn.pending_bytes += len(frame)
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
        if conn.pending_bytes > self._limit:
            self.kill(conn, CloseCode.TOO_SLOW)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        self._write_out(dirty)
        if self._posted:
            posted, self._posted = self._posted, []
            wall_ms = time.time() * 1000
            for created in posted:
                self.metrics.delivery_latency.observe(max(0.0, wall_ms - created) / 1000)

    def write_now(self, conn: Connection) -> None:
        """Write what is queued for `conn` now, not at the end of the loop turn."""
        self._write_out((conn,))

    def _write_out(self, conns: Iterable[Connection]) -> None:
        """What is queued for each of `conns`, in one write per socket. The
        flush runs this loop once per socket per post: no Python function is
        called per socket in it, only the transport's and `os.write`.

        A socket whose transport holds nothing is written to directly (one
        `write(2)`, without the transport's own bookkeeping); what the socket
        does not take, and every write to a transport that still holds bytes,
        goes through the transport, so the bytes keep their order. The
        transport is asked first whether it is closing: its socket may then be
        closed already, and its number given to another connection."""
        limit = self._limit
        now = self._loop.time()
        write = os.write
        for conn in conns:
            # A socket written here and queued again before the flush is in
            # the flush's list twice: the second time it has nothing pending.
            conn.dirty = False
            pending = conn.pending
            if conn.closed or not pending:
                continue
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            conn.pending_bytes = 0
            transport = conn.transport
            if transport.is_closing():
                self.kill(conn, CloseCode.GOING_AWAY)
                continue
            conn.last_write = now
            if conn.fd >= 0 and not transport.get_write_buffer_size():
                try:
                    sent = write(conn.fd, data)
                except OSError:
                    sent = 0  # full (EAGAIN), or broken: the transport finds out which
                if sent == len(data):
                    continue
                data = data[sent:]
            transport.write(data)
            if transport.get_write_buffer_size() > limit:
                self.kill(conn, CloseCode.TOO_SLOW)

    @property
    def buffer_limit(self) -> int:
        """Bytes a socket may have queued (pending and in its transport)."""
        return self._limit

    def buffered(self, conn: Connection) -> int:
        return conn.pending_bytes + conn.transport.get_write_buffer_size()

    async def drain(self, conns: Collection[Connection], seconds: float) -> None:
        """Between pages of history: write what is queued, then wait until each
        socket has taken it down to half its bound. A page is small; a backlog
        of many is paced this way instead of overflowing the bound (4008) of
        readers that do keep up. One still over half after `seconds` is
        closed 4008 (it resumes with its cursor)."""
        for conn in conns:
            self.write_now(conn)
        half = self._limit // 2
        deadline = self._loop.time() + seconds
        while slow := [c for c in conns if not c.closed and self.buffered(c) > half]:
            if self._loop.time() > deadline:
                for conn in slow:
                    self.kill(conn, CloseCode.TOO_SLOW)
                return
            await asyncio.sleep(0.005)  # the transports signal no drain to the hub; poll them

    def sample(self) -> None:
        """Set the gauges of what the hub holds now and add its delivery counts to
        the counters; run at scrape time, off the delivery path."""
        m = self.metrics
        sse = sum(1 for conn in self.connections if conn.ws is None)
        m.connections.labels(kind="ws").set(len(self.connections) - sse)
        m.connections.labels(kind="sse").set(sse)
        pairs = dict.fromkeys(KINDS, 0)
        for st in self._by_feed.values():
            kind = st.feed.partition(":")[0]
            pairs[kind] = pairs.get(kind, 0) + len(st.live) + len(st.sse) + len(st.syncing)
        for kind, n in pairs.items():
            m.subscriptions.labels(kind=kind).set(n)
        m.live_feeds.set(len(self._by_feed))
        items, size = self._exported
        m.delivered_items.inc(self.delivered - items)
        m.delivered_bytes.inc(self.delivered_bytes - size)
        self._exported = (self.delivered, self.delivered_bytes)

    # -- lifecycle of sockets ---------------------------------------------------

    def add(self, conn: Connection) -> None:
        conn.last_write = self._loop.time()
        self.connections.add(conn)

    def remove(self, conn: Connection) -> None:
        if conn.done is not None and not conn.done.done():
            conn.done.set_result(None)
        conn.closed = True
        self.connections.discard(conn)
        for feed in list(conn.feeds):
            self.detach(feed, conn)
        conn.pending = []
        conn.pending_bytes = 0

    def kill(self, conn: Connection, code: int, message: str = "") -> None:
        """Drop `conn` from every feed now and close it with `code` in the background."""
        if conn.closed:
            return
        self.metrics.closes.labels(code=str(int(code))).inc()
        if code == CloseCode.TOO_SLOW:
            self.slow_closes += 1
            self.metrics.slow_closes.inc()
            message = message or "client fell too far behind; resume from the last cursor"
        else:
            self.write_now(conn)  # what was said before the close still goes out
        self.remove(conn)
        task = asyncio.ensure_future(self._close(conn, code, message))
        self._closing[conn] = task
        task.add_done_callback(lambda _: self._closing.pop(conn, None))

    async def wait_closed(self, conn: Connection) -> None:
        """Wait for a close the hub started (the handshake with the client)."""
        task = self._closing.get(conn)
        if task is not None:
            await asyncio.shield(task)

    async def _close(self, conn: Connection, code: int, message: str) -> None:
        transport = conn.transport
        if conn.ws is None:  # SSE: the end of the response is the close
            if code == CloseCode.TOO_SLOW:
                transport.abort()  # it does not read: nothing more will get through
            elif not transport.is_closing():
                transport.write(b"0\r\n\r\n")  # the last chunk: a clean end
                transport.close()  # graceful: what is buffered still goes out
            return
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=message.encode()), timeout=5)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            # Unconditionally: after a timed-out close, aiohttp has called the
            # graceful transport.close(), which would wait for a peer that does
            # not read, holding the socket and its buffers.
            transport.abort()

    async def close_all(self, code: int = CloseCode.GOING_AWAY) -> None:
        """Flush what is queued, then close every socket with `code`."""
        for conn in list(self.connections):
            self.kill(conn, code, "server is going away; reconnect and resume")
        if self._closing:
            await asyncio.gather(*self._closing.values(), return_exceptions=True)

    # -- heartbeats and resync --------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    async def _heartbeats(self) -> None:
        """One timer for every connection: heartbeats after quiet, WebSocket pings
        and dead peers, token expiries, SSE readers gone.

        A sweep visits every connection once, a slice per tick, so that sockets
        that connected together are not all pinged in the same loop turn."""
        s = self._settings
        period = min(s.heartbeat_seconds, s.sse_keepalive_seconds, s.ws_ping_seconds, 10.0) / 5
        ticks = 10
        while True:
            conns = list(self.connections)
            size = -(-len(conns) // ticks)
            for i in range(ticks):
                await asyncio.sleep(period / ticks)
                self._sweep(conns[i * size : (i + 1) * size])

    def _sweep(self, conns: list[Connection]) -> None:
        s = self._settings
        ws_quiet, sse_quiet = s.heartbeat_seconds, s.sse_keepalive_seconds
        ping_every, pong_within = s.ws_ping_seconds, s.ws_ping_seconds / 2
        now = self._loop.time()
        wall = time.time()
        payload: bytes | None = None
        for conn in conns:
            if conn.closed:
                continue
            expires = conn.principal.expires_at if conn.principal is not None else None
            if expires is not None and expires <= wall:
                self.kill(conn, CloseCode.TOKEN_REVOKED, "the token expired")
                continue
            ws = conn.ws
            if ws is not None:
                ping = ws.keepalive(now, ping_every, pong_within)
                if conn.closed:
                    continue
                if ping:
                    if now - conn.last_write >= min(ping_every, ws_quiet):
                        # Quiet both ways: the heartbeat goes out early, with the ping, in one write.
                        if payload is None:
                            payload = heartbeat_frame(int(wall * 1000))
                        self.send(conn, payload)
                        self._queue(conn, PING_FRAME)
                    elif not conn.transport.is_closing():
                        # Not through `pending`: a ping is no heartbeat (browsers do not see it).
                        conn.transport.write(PING_FRAME)
                    continue
            elif conn.transport.is_closing():
                self.remove(conn)  # an SSE reader that went away
                continue
            if now - conn.last_write >= (ws_quiet if ws is not None else sse_quiet):
                if payload is None:
                    payload = heartbeat_frame(int(wall * 1000))
                self.send(conn, payload)

    def _resync_all(self, channels: frozenset[bytes]) -> None:
        """The live stream of `channels` broke and is back: fill in their feeds
        from the histories. Called before any new message of theirs is read."""
        for channel in channels:
            st = self._by_channel.get(channel)
            if st is None or not (st.live or st.sse or st.syncing):
                continue
            if st.resync is not None:
                st.again = True  # a refill is running: it reads the history once more
                continue
            # Hold the feed's live items now, not when its refill starts: a
            # live item delivered meanwhile would move `last` past the items
            # the history read is about to find.
            st.resync = Handoff(last=st.last)
            self._keep(asyncio.ensure_future(self._resync(st)))

    async def _resync(self, st: FeedState) -> None:
        assert st.resync is not None
        caught_up = False
        try:
            # One feed at a time: the refills of the feeds one reader follows
            # all go to its one socket, and each paces only what it queues.
            async with self._refilling:
                # Its held items leave the waiting feeds' share.
                self._held -= st.resync.held_bytes
                self._refilled = st
                for attempt in range(RESYNC_ATTEMPTS):
                    try:
                        caught_up = await self._refill(st)
                        break
                    except TRANSIENT_ERRORS:
                        # A pooled connection that died with the old Redis fails
                        # its first command: try again on a fresh one. What was
                        # delivered is not read twice (the handoff's `last`).
                        if attempt == RESYNC_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(0.05 * 2**attempt)
            if not caught_up:
                log.warning(
                    "refill of %s read its history %d times without catching up with its live items;"
                    " its subscribers are closed to resume",
                    st.feed,
                    RESYNC_PASSES + 1,
                )
        except Exception:
            log.exception("resync of %s failed; its subscribers are closed to resume", st.feed)
        finally:
            # Nothing is held once the refill caught up. Otherwise what is
            # held may follow a gap: it is let go, for the history to give it
            # to the readers that resume.
            handoff, st.resync = st.resync, None
            if self._refilled is st:
                self._refilled = None
            elif handoff is not None:  # it failed before its turn
                self._held -= handoff.held_bytes
            if handoff is not None:
                st.last = max(st.last, handoff.last)
        if not caught_up:
            # Each resumes from its own cursor (1001): what it was sent before
            # the close has no gap. Readers still replaying go too: their
            # handoffs lack what the refill did not deliver.
            for conn in [*st.live, *st.sse, *st.syncing]:
                self.kill(conn, CloseCode.GOING_AWAY)

    async def _release_held(self, st: FeedState, queued: int) -> int:
        """The live items held during the refill, paced like it; the ones that
        arrive meanwhile are held too and go out in this same loop. Stops when
        the history must be read first (`st.again`): the next held item may
        follow a gap. Returns the bytes queued since the last drain."""
        assert st.resync is not None
        for held_id, payload in st.resync.take_held():
            self._deliver(st, held_id, payload)
            queued = await self._pace(st, queued + len(payload))
            if st.again:
                break
        return queued

    async def _pace(self, st: FeedState, queued: int) -> int:
        """Bytes queued to the feed's readers since they were last drained, after
        draining them once that reaches a quarter of their bound: a backlog of
        any size, in pages of any size, stays under the bound."""
        if queued < self._limit // 4:
            return queued
        await self.drain([*st.live, *st.sse], RESYNC_DRAIN_SECONDS)
        return 0

    def _close_readers_behind(self, st: FeedState, snap: history.Snapshot) -> None:
        """Close (1001) the feed's readers for whom the history no longer holds
        every item after the last they were sent: items after it were trimmed
        meanwhile, or the history was lost (gone, or another epoch). Each
        resumes from its cursor, and its resume answers `gap: true`; a refill
        would skip those items without a word."""
        epoch = st.epoch or cursors.NO_EPOCH

        def gap(seen: EntryId) -> bool:
            # The rule a resume from (epoch, seen) answers `gap` by.
            return cursors.plan_resume(cursors.Cursor(epoch, seen), snap.epoch, snap.trimmed).gap

        # Where a reader is: the live items it was sent, or its replay if that went further.
        behind = [c for c in [*st.live, *st.sse] if gap(max(st.last, st.filters.get(c, cursors.ZERO)))]
        if gap(st.last):
            # A replay under way holds the refill's items: it cannot follow a gap either.
            behind += st.syncing
        if behind:
            log.info("refill of %s: items %d readers did not get are no longer in its history; they resume", st.feed, len(behind))
        for conn in behind:
            self.kill(conn, CloseCode.GOING_AWAY)

    async def _refill(self, st: FeedState) -> bool:
        """Deliver the feed's history after the handoff's `last`, page by page,
        paced, then the live items held meanwhile. Reads the history once more
        whenever `st.again` was set meanwhile; False when it still is after
        RESYNC_PASSES more passes."""
        assert st.resync is not None
        snap = await self.histories.snapshot(st.feed, 1)
        self._close_readers_behind(st, snap)
        if not (st.live or st.sse or st.syncing):
            return True  # no reader left to refill
        st.epoch = snap.epoch if snap.epoch is not None else st.epoch
        queued = 0
        for _ in range(1 + RESYNC_PASSES):
            st.again = False
            after = st.resync.last
            while True:
                entries = await self.histories.read_after(st.feed, after, self._settings.replay_page)
                for entry in entries:
                    entry_id = cursors.parse_entry_id(entry[0])
                    if st.resync.replayed(entry_id):
                        payload = history.item_frame(st.feed, snap.epoch, entry)
                        self._deliver(st, entry_id, payload)
                        queued = await self._pace(st, queued + len(payload))
                    after = entry_id
                if len(entries) < self._settings.replay_page:
                    break
            if not st.again:
                # Nothing was let go or missed while the history was read: the
                # held items follow it with no gap.
                queued = await self._release_held(st, queued)
                if not st.again:
                    return True
        return False
