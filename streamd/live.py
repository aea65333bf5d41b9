"""Live channels: the process's subscriptions to feed channels, one connection per Redis node.

A process subscribes to a feed's channel once, however many local sockets
read it. `subscribe` returns when Redis has confirmed the subscription, so a
reader of the history after that point cannot miss an item: anything not yet
in the history is published after the confirmation.

With one Redis server there is one connection (SUBSCRIBE). Under Redis
Cluster the channels are sharded (SSUBSCRIBE): a feed's channel shares the
hash tag of the feed's keys, so it lives on the master that writes the feed,
and there is one connection per master that owns a subscribed channel.

A channel's live stream breaks when its connection is lost, when the server
drops it because its slot moved (a migration or a failover: Redis pushes
`sunsubscribe`), or when a subscribe is refused with MOVED. The channel is
then routed again from a refreshed slot table (with one server: the same
server, after a back-off) and subscribed on its owner. As soon as a channel
that had been live is confirmed again, `on_resync` is called with it, before
any of its messages is passed on: the hub holds its live items and fills in
from the history what was published meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial

import hiredis
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.cluster import REDIS_CLUSTER_HASH_SLOTS
from redis.crc import key_slot
from redis.exceptions import (
    ConnectionError,
    InvalidResponse,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)

from streamd.metrics import Metrics
from streamd.store import TRANSIENT_ERRORS, AnyRedis

log = logging.getLogger("streamd.live")

OnMessage = Callable[[bytes, bytes], None]
# Called with channels that are live again after a break, before their next message.
OnResync = Callable[[frozenset[bytes]], None]


class _Single:
    """One Redis server: every channel on the one connection, classic pub/sub."""

    sharded = False
    verbs = (b"subscribe", b"unsubscribe", b"message")

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool

    def address(self, channel: bytes) -> str:
        return ""

    async def refresh(self) -> None:
        pass

    def connection(self, address: str) -> AbstractConnection:
        kwargs = dict(self._pool.connection_kwargs)
        # Nothing but its `_Replies` reads from this connection once it is greeted.
        kwargs["health_check_interval"] = 0
        kwargs["socket_timeout"] = None
        conn: AbstractConnection = self._pool.connection_class(**kwargs)
        return conn


_INCOMPLETE = object()  # what the reply parser gives while a reply is still arriving


class _Replies(asyncio.Protocol):
    """The live connection's protocol once it is connected and greeted: every
    chunk the socket gives is parsed at once (hiredis) and each complete reply
    handled in the same callback. A message costs no task wake-up, no await
    and none of redis-py's per-call checks; over RESP3 nor does it go through
    its push handler, which renders each message into a debug line, logged or
    not."""

    def __init__(
        self,
        parse_error: Callable[[str], Exception],
        message: bytes,
        on_message: OnMessage,
        on_reply: Callable[[object], None],
    ) -> None:
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=parse_error, notEnoughData=_INCOMPLETE)
        self._message = message  # the kind of a message: b"message", or b"smessage" (sharded)
        self._on_message = on_message
        self._on_reply = on_reply  # any other reply
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def take_over(self, conn: AbstractConnection) -> asyncio.Transport:
        """Become the protocol of `conn`'s transport (its stream reader has
        nothing left to parse after the greeting: nothing was subscribed yet)."""
        writer, stream = getattr(conn, "_writer", None), getattr(conn, "_reader", None)
        transport: asyncio.Transport | None = None if writer is None else writer.transport
        if transport is None or stream is None or transport.is_closing() or stream.at_eof():
            # Lost before it could be taken over: its connection_lost went to the stream.
            raise ConnectionError("the live connection closed as it opened")
        transport.set_protocol(self)
        left = bytes(getattr(stream, "_buffer", b""))
        if left:
            self.data_received(left)
        return transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        message, on_message, on_reply = self._message, self._on_message, self._on_reply
        while (reply := reader.gets()) is not _INCOMPLETE:
            # A message is a push (RESP3) or a list (RESP2): [kind, channel, data].
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == message:
                on_message(reply[1], reply[2])
            else:
                on_reply(reply)

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class _Sharded:
    """Redis Cluster: each channel on the master that owns its slot, sharded pub/sub.

    The slot table is this class's own, read with CLUSTER SLOTS on a
    connection of its own: refreshing the cluster client's table would make it
    recycle every pooled connection, under the requests in flight."""

    sharded = True
    verbs = (b"ssubscribe", b"sunsubscribe", b"smessage")

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._owners: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS  # slot -> "host:port"

    def address(self, channel: bytes) -> str:
        owner = self._owners[key_slot(channel)]
        if owner is None:
            raise SlotNotCoveredError("no slot table yet, or the slot is not served")
        return owner

    async def refresh(self) -> None:
        """Read the slot table from the first node that answers."""
        nodes = self._client.nodes_manager
        known = {*(o for o in self._owners if o), *nodes.nodes_cache, *nodes.startup_nodes}
        candidates = list(known)
        random.shuffle(candidates)
        error: Exception | None = None
        for address in candidates:
            conn = self.connection(address)
            try:
                await conn.connect()
                await conn.send_command("CLUSTER", "SLOTS")
                ranges = await conn.read_response(timeout=5)
                if ranges is None:
                    raise RedisClusterException(f"{address} did not answer CLUSTER SLOTS in time")
            except (*TRANSIENT_ERRORS, ResponseError) as err:
                error = err
                continue
            finally:
                await conn.disconnect(nowait=True)
            host = address.rsplit(":", 1)[0]
            owners: list[str | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for low, high, primary, *_ in ranges:
                owner = f"{(primary[0] or host.encode()).decode()}:{int(primary[1])}"
                owners[int(low) : int(high) + 1] = [owner] * (int(high) - int(low) + 1)
            self._owners = owners
            return
        raise RedisClusterException(f"no cluster node answers CLUSTER SLOTS: {error}")

    def connection(self, address: str) -> AbstractConnection:
        host, _, port = address.rpartition(":")
        # A node object only to get the client's connection class and settings.
        node = ClusterNode(host, int(port), **self._client.nodes_manager.connection_kwargs)
        kwargs = dict(node.connection_kwargs)
        kwargs["health_check_interval"] = 0
        kwargs["socket_timeout"] = None
        conn: AbstractConnection = node.connection_class(**kwargs)
        return conn


class _Link:
    """One connection to one node and the channels routed to it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.conn: AbstractConnection | None = None
        self.transport: asyncio.Transport | None = None  # conn's, read by a `_Replies`
        self.channels: set[bytes] = set()  # routed here
        self.confirmed: set[bytes] = set()  # and confirmed by the server
        # The replies still owed to commands sent, in order: (kind, channel).
        # A `sunsubscribe` that is not one of them is the server dropping a
        # channel whose slot moved away.
        self.owed: deque[tuple[bytes, bytes]] = deque()
        self.task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.conn is not None


class LiveChannels:
    def __init__(
        self, client: AnyRedis, on_message: OnMessage, on_resync: OnResync, metrics: Metrics | None = None
    ) -> None:
        self._router: _Single | _Sharded = _Sharded(client) if isinstance(client, RedisCluster) else _Single(client)
        self._subscribe, self._unsubscribe, self._message = self._router.verbs
        self._metrics = metrics if metrics is not None else Metrics()
        self._on_message = on_message
        self._on_resync = on_resync
        self._wanted: set[bytes] = set()
        self._links: dict[str, _Link] = {}
        self._route: dict[bytes, _Link] = {}
        self._homeless: set[bytes] = set()  # wanted, routed nowhere yet
        self._broken: set[bytes] = set()  # were live, and will need a refill once confirmed
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        # Set while Redis is reachable: at least one connection is up.
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._rehome_needed = asyncio.Event()
        self._backoff = 0.05
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def sharded(self) -> bool:
        return self._router.sharded

    async def __aenter__(self) -> LiveChannels:
        self._task = asyncio.create_task(self._rehome_loop(), name="streamd-live")
        if not self.sharded:
            # One server: keep its connection up even with nothing subscribed,
            # so that `connected` says whether Redis is reachable.
            self._link_for("")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        tasks = [t for t in (self._task, *(link.task for link in self._links.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in list(self._links.values()):
            if link.conn is not None:
                await link.conn.disconnect(nowait=True)
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.cancel()

    # -- the API ------------------------------------------------------------------

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe (idempotent per channel) and wait for Redis to confirm."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        self._wanted.add(channel)
        link = self._route.get(channel)
        if link is None:
            self._assign(channel)
        elif link.up:
            self._send(link, self._subscribe, [channel])
        await fut

    async def unsubscribe(self, channel: bytes) -> None:
        self._wanted.discard(channel)
        self._homeless.discard(channel)
        self._broken.discard(channel)
        link = self._route.pop(channel, None)
        if link is not None:
            link.channels.discard(channel)
            link.confirmed.discard(channel)
            if link.up:
                self._send(link, self._unsubscribe, [channel])

    # -- routing ------------------------------------------------------------------

    def _assign(self, channel: bytes) -> None:
        """Route a wanted channel to its node's link; subscribe now if that link is up
        (else the link subscribes everything routed to it once it connects)."""
        try:
            address = self._router.address(channel)
        except RedisClusterException:  # no slot table yet
            self._make_homeless([channel])
            return
        link = self._link_for(address)
        link.channels.add(channel)
        self._route[channel] = link
        if link.up:
            self._send(link, self._subscribe, [channel])

    def _link_for(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = _Link(address)
            link.task = asyncio.create_task(self._run(link), name=f"streamd-live-{address or 'redis'}")
        return link

    def _make_homeless(self, channels: Iterable[bytes]) -> None:
        for channel in channels:
            if channel in self._wanted:
                self._route.pop(channel, None)
                self._homeless.add(channel)
        if self._homeless:
            self._rehome_needed.set()

    async def _rehome_loop(self) -> None:
        """Route the homeless channels again, after a back-off and a fresh slot table."""
        while True:
            await self._rehome_needed.wait()
            await asyncio.sleep(self._backoff * random.uniform(0.5, 1.5))
            self._backoff = min(self._backoff * 2, 5.0)
            try:
                await self._router.refresh()
            except (*TRANSIENT_ERRORS, RedisClusterException) as err:
                log.warning("live: cannot read the cluster's slots (%s); retrying", err)
                continue
            self._rehome_needed.clear()
            homeless, self._homeless = self._homeless, set()
            for channel in homeless:
                if channel in self._wanted and channel not in self._route:
                    self._assign(channel)
            if not self.sharded and "" not in self._links:
                self._link_for("")

    # -- one connection -----------------------------------------------------------

    async def _run(self, link: _Link) -> None:
        conn = self._router.connection(link.address)
        replies = _Replies(BaseParser.parse_error, self._message, self._on_message, partial(self._on_reply, link))
        try:
            await conn.connect()
            link.transport = replies.take_over(conn)
            link.conn = conn
            if link.channels:
                self._send(link, self._subscribe, sorted(link.channels))
            self.connected.set()
            exc = await replies.lost
            if exc is not None and not isinstance(exc, (OSError, RedisError)):
                log.error("live: a reply could not be handled; reconnecting", exc_info=exc)
            raise ConnectionError(str(exc) if exc is not None else "closed by the server")
        except (*TRANSIENT_ERRORS, RedisClusterException) as err:
            if link.up:
                log.warning("live: redis connection lost (%s); reconnecting", err)
            else:
                log.debug("live: cannot connect to %s (%s)", link.address or "redis", err)
        finally:
            was_up = link.up
            link.conn = None
            link.transport = None
            await conn.disconnect(nowait=True)
            if self._links.get(link.address) is link:
                del self._links[link.address]
            if not any(other.up for other in self._links.values()):
                self.connected.clear()
            if not self._closed:
                if was_up:
                    self.reconnects += 1
                    self._metrics.live_reconnects.inc()
                self._broken |= link.confirmed & self._wanted
                self._make_homeless(link.channels)
                if not self.sharded:
                    self._rehome_needed.set()  # the one connection comes back even with no channel

    def _send(self, link: _Link, verb: bytes, channels: list[bytes]) -> None:
        conn, transport = link.conn, link.transport
        if conn is None or transport is None or transport.is_closing():
            return  # the link is reconnecting: it subscribes to its channels once it is up
        commands: list[tuple[bytes, ...]]
        if self.sharded:
            # Every channel of one SSUBSCRIBE must hash to one slot: one command each.
            commands = [(verb, channel) for channel in channels]
        else:
            commands = [(verb, *channels)]
        link.owed.extend((verb, channel) for channel in channels)
        transport.writelines(conn.pack_commands(commands))

    def _on_reply(self, link: _Link, reply: object) -> None:
        """A reply that is not a message: a confirmation, a refusal, or the
        server dropping a channel whose slot moved."""
        if isinstance(reply, ConnectionError):  # e.g. LOADING: the server cannot serve us now
            if link.transport is not None:
                link.transport.abort()
            return
        if isinstance(reply, ResponseError):
            # The reply to the oldest command still owed one: refused.
            kind, channel = link.owed.popleft() if link.owed else (b"", b"")
            self._refused(link, kind, channel, reply)
            return
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind, channel = reply[0], reply[1]
        owed = bool(link.owed) and link.owed[0] == (kind, channel)
        if owed:
            link.owed.popleft()
        if kind == self._subscribe:
            self._confirmed(link, channel)
        elif kind == self._unsubscribe and not owed:
            self._dropped(link, channel)

    def _confirmed(self, link: _Link, channel: bytes) -> None:
        if channel not in self._wanted or self._route.get(channel) is not link:
            return  # unsubscribed or moved meanwhile; its SUNSUBSCRIBE follows
        link.confirmed.add(channel)
        self._backoff = 0.05
        if channel in self._broken:
            self._broken.discard(channel)
            # Before any message of the channel is read from this connection.
            self._on_resync(frozenset((channel,)))
        for fut in self._waiters.pop(channel, ()):
            if not fut.done():
                fut.set_result(None)

    def _dropped(self, link: _Link, channel: bytes) -> None:
        """The server unsubscribed us: the channel's slot is no longer served there."""
        if channel in self._wanted and self._route.get(channel) is link:
            log.info("live: %s moved off %s; subscribing on its new owner", channel.decode(errors="replace"), link.address)
            link.channels.discard(channel)
            if channel in link.confirmed:
                link.confirmed.discard(channel)
                self._broken.add(channel)
            self._make_homeless([channel])

    def _refused(self, link: _Link, kind: bytes, channel: bytes, err: ResponseError) -> None:
        if kind != self._subscribe or channel not in self._wanted or self._route.get(channel) is not link:
            log.warning("live: redis refused %s %r: %s", kind.decode(), channel, err)
            return
        link.channels.discard(channel)
        if isinstance(err, MovedError):  # the slot table was stale
            self._make_homeless([channel])
            return
        log.error("live: redis refused to subscribe to %r: %s", channel, err)
        self._wanted.discard(channel)
        self._route.pop(channel, None)
        for fut in self._waiters.pop(channel, ()):
            if not fut.done():
                fut.set_exception(err)

