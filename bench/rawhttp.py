"""A minimal HTTP/1.1 client for load generators: keep-alive, pipelined, no tasks.

aiohttp's client costs about 0.3-0.5 ms of CPU per request here, as much as the
server it drives, and the load generator shares a core with the servers in the
benchmarks. This client writes prebuilt requests straight to the transport and
parses answers in `data_received` (status line and Content-Length only, which
is all a streamd answer needs), about a tenth of that.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

# (status, body, token) of each answer, token being what the request was sent with.
Answered = Callable[[int, bytes, Any], None]


def request(method: str, host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection(asyncio.Protocol):
    """One keep-alive connection; answers come back in request order (HTTP/1.1 pipelining)."""

    def __init__(self, answered: Answered, on_lost: Callable[[Connection, list[Any]], None]) -> None:
        self.answered = answered
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.inflight: deque[Any] = deque()
        self._buf = b""

    def send(self, data: bytes, token: Any) -> None:
        assert self.transport is not None
        self.inflight.append(token)
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        lost, self.inflight = list(self.inflight), deque()
        self.on_lost(self, lost)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while (head_end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:head_end]
            length = _content_length(head)
            total = head_end + 4 + length
            if len(buf) < total:
                break
            status, body, buf = int(head[9:12]), buf[head_end + 4 : total], buf[total:]
            self.answered(status, body, self.inflight.popleft())
        self._buf = buf

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(url: str, answered: Answered, on_lost: Callable[[Connection, list[Any]], None]) -> Connection:
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    _, proto = await asyncio.get_running_loop().create_connection(
        lambda: Connection(answered, on_lost), host, int(port or 80)
    )
    return proto


def _content_length(head: bytes) -> int:
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : end if end > 0 else len(head)])
