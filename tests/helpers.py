"""Small clients for the tests: the HTTP API and one WebSocket."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

ADMIN_TOKEN = "test-admin-token"
TIMEOUT = 10.0


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        *,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        async with self.session.request(method, self.base + path, data=data, headers=headers) as resp:
            text = await resp.read()
            return resp.status, (orjson.loads(text) if text else None)

    async def user(self, handle: str) -> str:
        status, body = await self.call("POST", "/v1/users", {"handle": handle}, ADMIN_TOKEN)
        assert status == 201, body
        token: str = body["token"]
        return token

    async def post(self, token: str, text: str, **fields: Any) -> dict[str, Any]:
        status, body = await self.call("POST", "/v1/posts", {"text": text, **fields}, token)
        assert status == 201, body
        post: dict[str, Any] = body["post"]
        return post


class WsClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ref = 0

    async def send(self, **frame: Any) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        frame: dict[str, Any] = orjson.loads(msg.data)
        return frame

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send an op with a fresh ref and return the reply carrying that ref."""
        self._ref += 1
        ref = self._ref
        await self.send(op=op, ref=ref, **fields)
        reply = await self.recv()
        assert reply.get("ref") == ref, reply
        return reply

    async def subscribe(self, feed: str, **fields: Any) -> dict[str, Any]:
        reply = await self.request("subscribe", feed=feed, **fields)
        assert reply["op"] == "subscribed", reply
        return reply

    async def items(self, n: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        out = [await self.recv(timeout) for _ in range(n)]
        for frame in out:
            assert frame["op"] in ("post", "delete"), frame
        return out

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Read until the server closes; the close code."""
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
