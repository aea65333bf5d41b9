"""A minimal WebSocket client for the load generator: an asyncio Protocol, callbacks, no tasks.

aiohttp's client costs ~20 us of CPU per frame received (a future and an
await per message); on a 2-core machine where the load generator shares a
core with Redis, that is what saturates first. This protocol parses frames in
`data_received` and calls `on_text(payload)` for each text frame: a few
microseconds per frame, so the load generator can follow the servers.

Only what a benchmark client needs: the RFC 6455 opening handshake (no
extensions, so no permessage-deflate), unmasked server frames of any length,
fragmented messages, ping -> pong, close. Client frames are masked as the RFC
requires.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import Callable
from typing import cast

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEADER = 16 * 1024


class HandshakeError(ConnectionError):
    pass


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    # XOR as one big integer: far faster in Python than a loop over bytes.
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + _mask(payload, key)


class WSClient(asyncio.Protocol):
    """One client connection. `on_text(payload: bytes)` runs for every complete text message."""

    __slots__ = (
        "_buf",
        "_fragments",
        "_host",
        "_path",
        "_upgraded",
        "close_code",
        "closed",
        "on_close",
        "on_text",
        "opened",
        "transport",
    )

    def __init__(self, host: str, path: str, on_text: Callable[[bytes], None]) -> None:
        self._host = host
        self._path = path
        self.on_text = on_text
        self.on_close: Callable[[WSClient], None] | None = None
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self._path} HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if self._upgraded and not buf:
            # Most reads are whole unfragmented text frames, one or a few: read
            # them from `data` as it is; only what is left goes to the buffer.
            pos, n = 0, len(data)
            on_text = self.on_text
            while n - pos >= 2 and data[pos] == 0x81:
                length = data[pos + 1]
                if length < 126:
                    start = pos + 2
                elif length == 126 and n - pos >= 4:
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    start = pos + 4
                else:
                    break
                end = start + length
                if end > n:
                    break
                on_text(data[start:end])
                pos = end
            if pos == n:
                return
            if pos:
                data = data[pos:]
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER:
                    self._fail(HandshakeError("handshake response too long"))
                return
            status_line = bytes(buf[: buf.find(b"\r\n")])
            if b" 101 " not in status_line + b" ":
                self._fail(HandshakeError(status_line.decode(errors="replace")))
                return
            del buf[: end + 4]
            self._upgraded = True
            if not self.opened.done():
                self.opened.set_result(None)
        pos = 0
        n = len(buf)
        on_text = self.on_text
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            payload = bytes(buf[start:end])
            pos = end
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode == OP_TEXT and fin:
                on_text(payload)
            elif opcode in (OP_TEXT, OP_BINARY):
                self._fragments = [payload] if opcode == OP_TEXT else None
            elif opcode == OP_CONT:
                if self._fragments is not None:
                    self._fragments.append(payload)
                    if fin:
                        whole, self._fragments = b"".join(self._fragments), None
                        on_text(whole)
            elif opcode == OP_PING:
                self._write(client_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self._write(client_frame(OP_CLOSE, payload[:2]))
                if self.transport is not None:
                    self.transport.close()
                pos = n
                break
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    # -- sending ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, text: str | bytes) -> None:
        self._write(client_frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    def close(self, code: int = 1000) -> None:
        self._write(client_frame(OP_CLOSE, struct.pack("!H", code)))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, err: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(err)
        if self.transport is not None:
            self.transport.abort()


async def connect(
    host: str,
    port: int,
    path: str,
    on_text: Callable[[bytes], None],
    timeout: float = 30.0,
    on_create: Callable[[WSClient], None] | None = None,
) -> WSClient:
    """Open the connection and finish the handshake.

    `on_create` gets the client before any byte arrives: a server that speaks
    first (Engine.IO's open packet) may do so in the same read as the 101.
    """
    loop = asyncio.get_running_loop()

    def factory() -> WSClient:
        client = WSClient(f"{host}:{port}", path, on_text)
        if on_create is not None:
            on_create(client)
        return client

    _, proto = await asyncio.wait_for(loop.create_connection(factory, host, port), timeout)
    await asyncio.wait_for(asyncio.shield(proto.opened), timeout)
    return proto
