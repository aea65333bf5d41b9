"""The socket after the upgrade, byte for byte: framing, control frames and the
closing handshake of RFC 6455, against the real server with a raw client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from streamd import wsframe
from streamd.http_base import HUB
from streamd.hub import socket_fd
from tests.test_ws_frames import client_frame

TIMEOUT = 10


def upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawWs:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, opcode: int, payload: bytes, **kw: Any) -> None:
        self.writer.write(client_frame(opcode, payload, **kw))

    def send_json(self, **frame: Any) -> None:
        self.send(wsframe.TEXT, orjson.dumps(frame))

    async def frame(self) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(2), TIMEOUT)
        assert not head[1] & 0x80, "server frames are not masked"
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        payload = await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT) if n else b""
        assert head[0] & 0x80, "streamd sends whole messages"
        return head[0] & 0x0F, payload

    async def text(self) -> dict[str, Any]:
        while True:
            opcode, payload = await self.frame()
            if opcode == wsframe.TEXT:
                message: dict[str, Any] = orjson.loads(payload)
                if message["op"] != "heartbeat":
                    return message
            else:
                assert opcode in (wsframe.PING, wsframe.PONG), opcode

    async def close_code(self) -> int:
        """Skip to the server's close frame; its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == wsframe.CLOSE:
                return int(struct.unpack("!H", payload[:2])[0])

    async def eof(self) -> None:
        assert await asyncio.wait_for(self.reader.read(), TIMEOUT) == b""


@pytest.fixture
async def raw(server: Any) -> AsyncIterator[Callable[..., Any]]:
    opened: list[RawWs] = []

    async def connect(early: bytes = b"") -> RawWs:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade_request() + early)
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status.startswith(b"HTTP/1.1 101"), status
        ws = RawWs(reader, writer)
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        ws.writer.close()


async def test_a_fragmented_message_with_a_ping_between_its_fragments(raw: Any) -> None:
    ws = await raw()
    text = orjson.dumps({"op": "ping", "ref": "frag"})
    ws.send(wsframe.TEXT, text[:5], fin=False)
    ws.send(wsframe.CONTINUATION, text[5:9], fin=False)
    ws.send(wsframe.PING, b"are you there")
    ws.send(wsframe.CONTINUATION, text[9:])
    assert await ws.frame() == (wsframe.PONG, b"are you there")
    assert await ws.text() == {"op": "pong", "ref": "frag"}


async def test_frames_sent_right_behind_the_upgrade_request_are_answered(raw: Any) -> None:
    pings = [client_frame(wsframe.TEXT, b'{"op":"ping","ref":%d}' % ref) for ref in (1, 2)]
    ws = await raw(early=b"".join(pings))
    assert await ws.text() == {"op": "pong", "ref": 1}
    assert await ws.text() == {"op": "pong", "ref": 2}


async def test_ops_are_answered_in_order_while_a_subscribe_waits(raw: Any) -> None:
    ws = await raw()
    ws.writer.write(
        b"".join(
            client_frame(wsframe.TEXT, orjson.dumps(f))
            for f in (
                {"op": "subscribe", "feed": "user:ann", "ref": 1},
                {"op": "ping", "ref": 2},
                {"op": "unsubscribe", "feed": "user:ann", "ref": 3},
            )
        )
    )
    assert [(m["op"], m["ref"]) for m in [await ws.text() for _ in range(3)]] == [
        ("subscribed", 1),
        ("pong", 2),
        ("unsubscribed", 3),
    ]


@pytest.mark.parametrize(
    "frame, code",
    [
        (client_frame(wsframe.TEXT, b'{"op":"ping"}', masked=False), 1002),
        (client_frame(wsframe.TEXT, b'{"op":"ping"}', rsv=0x40), 1002),
        (client_frame(0x3, b""), 1002),
        (client_frame(wsframe.CONTINUATION, b"x"), 1002),
        (client_frame(wsframe.TEXT, b'{"op":"\xff"}'), 1007),
        (client_frame(wsframe.TEXT, b"x" * 3000, fin=False) + client_frame(wsframe.CONTINUATION, b"x" * 3000), 1009),
    ],
)
async def test_a_broken_frame_fails_the_connection(raw: Any, server: Any, frame: bytes, code: int) -> None:
    ws = await raw()
    ws.writer.write(frame)
    assert await ws.close_code() == code
    await ws.eof()  # the server does not wait for an answer to this close
    assert not server.app[HUB].connections


async def test_a_close_from_the_client_is_echoed_and_the_server_hangs_up(raw: Any, server: Any) -> None:
    ws = await raw()
    ws.send_json(op="subscribe", feed="user:ann")
    assert (await ws.text())["op"] == "subscribed"
    ws.send(wsframe.CLOSE, struct.pack("!H", 1000) + b"done")
    assert await ws.close_code() == 1000
    await ws.eof()
    assert not server.app[HUB].connections


async def test_a_close_the_server_starts_ends_when_the_client_answers(raw: Any, server: Any) -> None:
    ws = await raw()
    ws.send(wsframe.BINARY, b"\x00")
    assert await ws.close_code() == 1003
    ws.send(wsframe.CLOSE, struct.pack("!H", 1003))
    await ws.eof()


async def test_aiohttp_lets_go_of_an_upgraded_connection(raw: Any, server: Any) -> None:
    ws = await raw()
    ws.send_json(op="ping", ref=1)
    assert (await ws.text())["op"] == "pong"
    for _ in range(200):  # its request handler ends right after the upgrade
        if not server.runner.server.connections:
            break
        await asyncio.sleep(0.01)
    assert not server.runner.server.connections
    assert len(server.app[HUB].connections) == 1


async def test_a_peer_that_answers_pings_is_kept(start_server: Any, settings: Any) -> None:
    srv = await start_server(settings.replace(ws_ping_seconds=0.2))
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(upgrade_request())
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 101")
    ws = RawWs(reader, writer)
    pings = 0
    while pings < 4:  # each unanswered ping would be the end of the socket
        opcode, payload = await ws.frame()
        if opcode == wsframe.PING:
            pings += 1
            ws.send(wsframe.PONG, payload)
    ws.send_json(op="ping", ref="still here")
    assert await ws.text() == {"op": "pong", "ref": "still here"}
    writer.close()


async def test_a_socket_quiet_both_ways_gets_its_heartbeat_with_the_ping(start_server: Any, settings: Any) -> None:
    srv = await start_server(settings.replace(ws_ping_seconds=0.2))  # the heartbeat alone would wait 25 s
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(upgrade_request())
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 101")
    ws = RawWs(reader, writer)
    opcode, payload = await ws.frame()
    assert opcode == wsframe.TEXT and orjson.loads(payload)["op"] == "heartbeat"
    assert (await ws.frame())[0] == wsframe.PING
    writer.close()


async def test_pings_from_a_client_that_reads_no_pongs_are_bounded(start_server: Any, settings: Any) -> None:
    # No heartbeat or ping in the test's time: only the pongs can fill the buffer.
    quiet = settings.replace(heartbeat_seconds=3600, ws_ping_seconds=3600)
    srv = await start_server(quiet.replace(socket_buffer_bytes=64 * 1024))
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(upgrade_request())
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)).startswith(b"HTTP/1.1 101")
    hub = srv.app[HUB]
    pings = client_frame(wsframe.PING, b"p" * 125) * 60_000  # 8 MB of pings, as much of pongs owed
    with contextlib.suppress(ConnectionError):  # the server may hang up under our writes
        for _ in range(10):  # far more than the kernel's socket buffers take
            if not hub.connections:
                break
            writer.write(pings)
            await writer.drain()
    assert not hub.connections and hub.slow_closes == 1, "closed with 4008 once its pongs piled up"
    writer.transport.abort()


async def test_frames_wait_behind_the_bytes_their_transport_holds(start_server: Any, settings: Any) -> None:
    # Frames are written straight to a socket only while its transport holds
    # nothing. Here the socket has room again (the client read it empty)
    # before the transport has written what it holds, and a frame is written
    # at that moment: it goes behind the held bytes, not ahead of them.
    quiet = settings.replace(heartbeat_seconds=3600, ws_ping_seconds=3600, socket_buffer_bytes=8 * 2**20)
    srv = await start_server(quiet)
    hub = srv.app[HUB]
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: the kernel fills up soon
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", srv.port))
    await loop.sock_sendall(sock, upgrade_request())
    got = b""
    while b"\r\n\r\n" not in got:
        got += await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
    assert got.startswith(b"HTTP/1.1 101"), got
    (conn,) = hub.connections
    # And a small send buffer on the server's side, rather than megabytes of frames.
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    received = bytearray(got.partition(b"\r\n\r\n")[2])

    def queue(n: int) -> None:
        hub.send(conn, orjson.dumps({"op": "pong", "ref": n, "pad": "x" * 1000}))
        hub.write_now(conn)

    sent = 0
    while not conn.transport.get_write_buffer_size():
        assert sent < 500, "the transport never had to hold what the socket did not take"
        queue(sent)
        sent += 1
    # In one go, with no turn of the loop between: the client reads what the
    # kernel holds for it, and the server writes a frame.
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(65536):
            received += chunk
    assert conn.transport.get_write_buffer_size(), "the transport still holds bytes"
    queue(sent)
    sent += 1
    refs: list[int] = []
    while len(refs) < sent:
        received += await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
        while len(received) >= 4 and len(received) >= 4 + (n := struct.unpack("!H", received[2:4])[0]):
            assert received[:2] == bytes((0x80 | wsframe.TEXT, 126)), "one unfragmented text frame of 126-65535 bytes"
            refs.append(orjson.loads(received[4 : 4 + n])["ref"])
            del received[: 4 + n]
    assert refs == list(range(sent))
    assert hub.connections == {conn}
    sock.close()


def test_only_a_plain_tcp_transport_is_written_past() -> None:
    assert socket_fd(asyncio.Transport()) == -1  # not a socket's: its bytes are its own to write
