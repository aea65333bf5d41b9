"""An auto-pipelined Redis connection for the ingest hot path.

Every command issued during one turn of the event loop, by any number of
concurrent requests, goes out in one write on one connection; replies come
back in order and resolve each caller's future. redis-py spends tens of
microseconds of Python per command (a pooled connection taken and given back,
a task-level timeout, retries, response callbacks); here a command costs its
encoding (hiredis, in C), a future and one slot in a queue.

Used for one Redis server only (under Cluster, commands of one turn would go
to several nodes: there the redis-py cluster client stays). It never retries:
a command written to a connection that is then lost fails with redis-py's
`ConnectionError` (a 503, like any other outage) because it may or may not
have run; the next command opens a new connection. Commands in flight are
bounded (`max_pending`): past it a caller fails at once instead of queueing
without end behind a Redis that stopped answering.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from streamd.cluster import URL_DEFAULT_PORT

DEFAULT_MAX_PENDING = 65536
CONNECT_TIMEOUT_S = 5.0


class _ReplyError(Exception):
    """hiredis's error replies, turned into redis-py's exception classes on the way out."""


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: AutoPipeline) -> None:
        self._owner = owner

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self, exc)

    def data_received(self, data: bytes) -> None:
        self._owner._received(self, data)


class AutoPipeline:
    """One connection to one Redis server, shared by every caller of this process."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if (port is None) == (path is None):
            raise ValueError("an auto-pipeline connects to a TCP port or a Unix socket path: give one")
        self._host, self._port, self._path = host, port, path
        self._hello: list[tuple[Any, ...]] = []
        if password:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        self._max_pending = max_pending
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader = hiredis.Reader(replyError=_ReplyError)
        self._written: deque[asyncio.Future[Any]] = deque()  # awaiting replies, in the order sent
        self._queued: list[bytes] = []  # this turn's commands, not written yet
        self._queued_futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_client(cls, client: aioredis.Redis, max_pending: int = DEFAULT_MAX_PENDING) -> AutoPipeline | None:
        """One for the server `client` talks to; None when its connections are not
        plain TCP or Unix sockets (TLS, for one): then the caller keeps `client`."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if pool.connection_class is aioredis.Connection:
            return cls(
                host=kwargs.get("host", "127.0.0.1"),
                port=int(kwargs.get("port") or URL_DEFAULT_PORT),
                db=int(kwargs.get("db", 0) or 0),
                username=kwargs.get("username"),
                password=kwargs.get("password"),
                max_pending=max_pending,
            )
        if pool.connection_class is aioredis.UnixDomainSocketConnection:
            return cls(
                path=kwargs["path"],
                db=int(kwargs.get("db", 0) or 0),
                username=kwargs.get("username"),
                password=kwargs.get("password"),
                max_pending=max_pending,
            )
        return None

    # -- commands -----------------------------------------------------------------

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command (this turn, with every other one); its reply, or the
        redis-py exception for an error reply or a lost connection."""
        if self._closed:
            raise RedisConnectionError("the auto-pipeline is closed")
        if len(self._written) + len(self._queued) >= self._max_pending:
            raise RedisConnectionError(f"{self._max_pending} commands already wait for Redis")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append(hiredis.pack_command(args))
        self._queued_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def evalsha(self, sha: str, text: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA, and EVAL once if the server does not have the script (a restart
        empties its script cache). Every streamd script skips work already done,
        but a NOSCRIPT means it did not run at all."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", text, len(keys), *keys, *args)

    # -- the connection -------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queued:
            return
        transport = self._transport
        if transport is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            return  # written once connected
        if transport.is_closing():
            return  # written on the next connection, once this one is reported lost
        data = self._queued[0] if len(self._queued) == 1 else b"".join(self._queued)
        self._written.extend(self._queued_futures)
        self._queued = []
        self._queued_futures = []
        transport.write(data)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if self._path is not None:
                    transport, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
                else:
                    assert self._port is not None  # checked in __init__: a port, or a path
                    transport, protocol = await loop.create_connection(lambda: _Protocol(self), self._host, self._port)
        except (OSError, TimeoutError) as exc:
            self._connecting = None
            self._fail_queued(RedisConnectionError(f"cannot connect to Redis: {exc!r}"))
            return
        self._connecting = None
        if self._closed:
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and self._path is None:
            # Commands are written as soon as the turn ends: never held back for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = hiredis.Reader(replyError=_ReplyError)
        self._transport = transport
        self._protocol = protocol
        # AUTH and SELECT go first; a failure among them fails the commands behind them too.
        hello = [hiredis.pack_command(cmd) for cmd in self._hello]
        for _ in hello:
            self._written.append(loop.create_future())
            self._written[-1].add_done_callback(self._check_hello)
        if hello:
            transport.write(b"".join(hello))
        self._flush()

    def _check_hello(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None and self._transport is not None:
            self._transport.close()

    def _received(self, protocol: _Protocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        reader = self._reader
        reader.feed(data)
        written = self._written
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                assert self._transport is not None
                self._transport.close()
                self._lost(protocol, exc)
                return
            if reply is False:
                return
            if not written:  # a reply nobody asked for: the stream is out of step
                assert self._transport is not None
                self._transport.close()
                return
            future = written.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, _ReplyError):
                future.set_exception(BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]
            else:
                future.set_result(reply)

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._transport = None
        self._protocol = None
        error = RedisConnectionError(f"connection to Redis lost: {exc!r}" if exc else "connection to Redis closed")
        written, self._written = self._written, deque()
        for future in written:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a caller that went away leaves no warning
        if self._queued and not self._flush_scheduled and self._loop is not None and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _fail_queued(self, error: Exception) -> None:
        futures, self._queued_futures, self._queued = self._queued_futures, [], []
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            try:
                await self._connecting
            except asyncio.CancelledError:
                # The connect's own cancellation is expected; the caller's is not ours to swallow.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception:  # noqa: S110 - closing: the connect's failure no longer matters
                pass
        self._fail_queued(RedisConnectionError("the auto-pipeline is closed"))
        if self._transport is not None:
            self._transport.close()
            if self._protocol is not None:
                self._lost(self._protocol, None)

