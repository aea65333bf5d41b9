"""One consumer per WebSocket: join rooms (groups), forward what is sent to them."""

from __future__ import annotations

from typing import Any

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only


def group_name(room: str) -> str:
    # Group names allow only ASCII letters, digits, hyphens, underscores and periods.
    return room.replace(":", ".")


class RoomConsumer(AsyncWebsocketConsumer):
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        msg = orjson.loads(text_data or "{}")
        if msg.get("op") == "join":
            await self.channel_layer.group_add(group_name(msg["room"]), self.channel_name)
            await self.send(text_data='{"op":"joined"}')

    async def post_message(self, event: dict[str, Any]) -> None:
        # `type: "post.message"`; the publisher built the frame once.
        await self.send(text_data=event["frame"])
