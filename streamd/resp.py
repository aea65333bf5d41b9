"""A bare RESP connection to one Redis server: the fan-out worker's hot path.

redis-py spends about 100 us of CPU on one round trip (pool, retries,
timeouts, reply callbacks, a task per send), and the worker makes two per
batch, so at a thousand posts a second (batches of one or two posts) that
overhead, not the work, was most of its CPU. Here a batch of commands is one
write, and the replies are parsed by hiredis as they are: about 15 us per
round trip. Error replies become the exceptions redis-py would raise and are
returned in place, not raised, like `pipeline.execute(raise_on_error=False)`.

Only for a single server over TCP or a Unix socket, without TLS
(`RespConnection.for_client` answers None otherwise): a Redis Cluster, or a
TLS connection, goes through redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError

Command = Sequence[Any]
READ_SIZE = 1 << 16


def pack(commands: Sequence[Command]) -> bytes:
    """RESP arrays of bulk strings, one per command, as one buffer."""
    parts: list[bytes] = []
    add = parts.append
    for command in commands:
        add(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is not bytes:
                arg = arg.encode() if type(arg) is str else str(arg).encode()
            add(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespConnection:
    """One connection, opened on first use and again after any failure."""

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._username, self._password, self._db = username, password, db
        self._connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader(replyError=BaseParser.parse_error)

    @classmethod
    def for_client(cls, client: Any) -> RespConnection | None:
        """A connection to the server of `client` (a redis-py client), or None
        when that is not a plain single-server connection."""
        if not isinstance(client, Redis):
            return None
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        if pool.connection_class is UnixDomainSocketConnection:
            where: dict[str, Any] = {"path": kwargs["path"]}
        elif pool.connection_class is Connection:
            where = {"host": kwargs.get("host", "localhost"), "port": int(kwargs.get("port", 6379))}
        else:
            return None  # TLS, or a connection class of its own
        return cls(
            **where,
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            db=int(kwargs.get("db") or 0),
            connect_timeout=kwargs.get("socket_connect_timeout") or 5.0,
        )

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and return their replies in order
        (error replies as exception objects). A broken or cancelled exchange
        closes the connection: its replies can no longer be matched."""
        try:
            if self._writer is None:
                await self._connect()
            assert self._writer is not None
            self._writer.write(pack(commands))
            return await self._replies(len(commands))
        except (OSError, EOFError, hiredis.ProtocolError) as err:
            self.close()
            raise RedisConnectionError(f"redis connection lost: {err!r}") from err
        except BaseException:
            self.close()
            raise

    async def _replies(self, count: int) -> list[Any]:
        assert self._reader is not None
        replies: list[Any] = []
        parser = self._parser
        while len(replies) < count:
            reply = parser.gets()
            if reply is False:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    raise EOFError("closed by the server")
                parser.feed(data)
            else:
                replies.append(reply)
        return replies

    async def _connect(self) -> None:
        if self._path is not None:
            opening = asyncio.open_unix_connection(self._path)
        else:
            opening = asyncio.open_connection(self._host, self._port)
        self._reader, self._writer = await asyncio.wait_for(opening, self._connect_timeout)
        self._parser = hiredis.Reader(replyError=BaseParser.parse_error)
        hello: list[Command] = []
        if self._password is not None:
            hello.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            hello.append(("SELECT", self._db))
        if hello:
            self._writer.write(pack(hello))
            for reply in await self._replies(len(hello)):
                if isinstance(reply, Exception):
                    raise reply

    def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
