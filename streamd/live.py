"""Live channels: one dedicated Redis connection carrying every feed subscription.

A process subscribes to a feed's channel once, however many local sockets
read it. `subscribe` returns when Redis has confirmed the subscription, so a
reader of the history after that point cannot miss an item: anything not yet
in the history is published after the confirmation. After a lost connection
the channels are subscribed again and `on_resync` is told, so the hub can fill
in from the histories what was published meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamd.metrics import Metrics

log = logging.getLogger("streamd.live")

OnMessage = Callable[[bytes, bytes], None]
OnResync = Callable[[], Awaitable[None]]


class LiveChannels:
    def __init__(
        self, client: aioredis.Redis, on_message: OnMessage, on_resync: OnResync, metrics: Metrics | None = None
    ) -> None:
        self._pool = client.connection_pool
        self._metrics = metrics if metrics is not None else Metrics()
        self._on_message = on_message
        self._on_resync = on_resync
        self._conn: aioredis.connection.AbstractConnection | None = None
        self._wanted: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._resync: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LiveChannels:
        self._task = asyncio.create_task(self._run(), name="streamd-live")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.cancel()

    async def subscribe(self, channel: bytes) -> None:
        """Subscribe (idempotent per channel) and wait for Redis to confirm."""
        fut = self._waiter(channel)
        self._wanted.add(channel)
        if self.connected.is_set():
            await self._send("SUBSCRIBE", channel)
        # Otherwise the reconnect loop subscribes every wanted channel.
        await fut

    def _waiter(self, channel: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        return fut

    async def _resync_when_confirmed(self, confirmations: list[asyncio.Future[None]]) -> None:
        # Read the histories only once every channel is live again, so that
        # whatever is missing from them is sure to arrive as a message.
        await asyncio.gather(*confirmations)
        await self._on_resync()

    async def unsubscribe(self, channel: bytes) -> None:
        self._wanted.discard(channel)
        if self.connected.is_set():
            await self._send("UNSUBSCRIBE", channel)

    async def _send(self, *args: str | bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.send_command(*args, check_health=False)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            pass  # the read loop sees the broken connection and reconnects

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            kwargs = dict(self._pool.connection_kwargs)
            # Nobody but the read loop may read from this connection.
            kwargs["health_check_interval"] = 0
            kwargs["socket_timeout"] = None
            conn = self._pool.connection_class(**kwargs)
            try:
                await conn.connect()
                self._conn = conn
                confirmations = [self._waiter(ch) for ch in self._wanted]
                if self._wanted:
                    await conn.send_command("SUBSCRIBE", *self._wanted, check_health=False)
                self.connected.set()
                if self.reconnects:
                    self._metrics.live_reconnects.inc()
                    self._resync = asyncio.create_task(self._resync_when_confirmed(confirmations))
                backoff = 0.05
                await self._read(conn)
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                if self.connected.is_set():
                    log.warning("live: redis connection lost (%s); reconnecting", err)
            finally:
                self.connected.clear()
                self._conn = None
                await conn.disconnect(nowait=True)
            self.reconnects += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 5.0)

    async def _read(self, conn: aioredis.connection.AbstractConnection) -> None:
        on_message = self._on_message
        while True:
            # push_request: subscribe replies and messages are push data to redis-py.
            reply = await conn.read_response(timeout=math.inf, push_request=True)
            kind = reply[0]
            if kind == b"message":
                on_message(reply[1], reply[2])
            elif kind == b"subscribe":
                for fut in self._waiters.pop(reply[1], ()):
                    if not fut.done():
                        fut.set_result(None)
