"""Server-Sent Events encoding of protocol messages, chunked for HTTP/1.1.

The same event bytes go to every SSE reader of a feed, so an event is
encoded, and chunk-framed, once.
"""

from __future__ import annotations

import orjson


def event_bytes(payload: bytes) -> bytes:
    """The SSE text for one protocol message ('' for messages SSE has no use for)."""
    message = orjson.loads(payload)
    op = message.get("op")
    if op in ("post", "delete"):
        return b"id: %s\nevent: %s\ndata: %s\n\n" % (message["cursor"].encode(), op.encode(), payload)
    if op == "subscribed":
        return b"event: gap\ndata: %s\n\n" % payload if message.get("gap") else b""
    if op == "error":
        return b"event: error\ndata: %s\n\n" % payload
    if op == "heartbeat":
        return b": heartbeat %d\n\n" % message["ts"]
    return b""


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


def sse_chunk(payload: bytes) -> bytes:
    return chunk(event_bytes(payload))
