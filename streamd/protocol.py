"""The WebSocket protocol, sans I/O: client frames in, server frames out.

`parse_client_frame` turns one text frame into a `ClientOp` or raises a
`StreamdError` carrying the request's `ref`; the `*_frame` functions build the
server's frames as bytes, ready to be framed and written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from streamd.errors import BadRequest, StreamdError
from streamd.feeds import parse_feed

Ref = str | int | float | None

_FIELDS: dict[str, frozenset[str]] = {
    "auth": frozenset({"op", "ref", "token"}),
    "subscribe": frozenset({"op", "ref", "feed", "cursor", "backlog"}),
    "unsubscribe": frozenset({"op", "ref", "feed"}),
    "ping": frozenset({"op", "ref"}),
}
MAX_REF_CHARS = 64
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True, slots=True)
class ClientOp:
    op: str
    ref: Ref = None
    feed: str | None = None
    cursor: str | None = None
    backlog: int = 0
    token: str | None = None


def parse_client_frame(text: str, *, max_backlog: int = 100) -> ClientOp:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadRequest("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("frame must be a JSON object")
    ref = obj.get("ref")
    if not _valid_ref(ref):
        raise BadRequest(f"ref must be a string of at most {MAX_REF_CHARS} characters or a number")
    try:
        return _parse_op(obj, ref, max_backlog)
    except StreamdError as err:
        err.ref = ref
        raise


def _valid_ref(ref: Any) -> bool:
    if ref is None:
        return True
    if isinstance(ref, bool):
        return False
    if isinstance(ref, str):
        return len(ref) <= MAX_REF_CHARS
    return isinstance(ref, (int, float)) and abs(ref) < 2**53


def _parse_op(obj: dict[str, Any], ref: Ref, max_backlog: int) -> ClientOp:
    op = obj.get("op")
    allowed = _FIELDS.get(op) if isinstance(op, str) else None
    if allowed is None:
        raise BadRequest(f"unknown op {str(op)[:40]!r}: use auth, subscribe, unsubscribe or ping")
    unknown = obj.keys() - allowed
    if unknown:
        raise BadRequest(f"unknown field(s) for {op}: {', '.join(sorted(unknown))}")
    if op == "ping":
        return ClientOp("ping", ref)
    if op == "auth":
        token = obj.get("token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise BadRequest("auth needs a token string")
        return ClientOp("auth", ref, token=token)
    feed = str(parse_feed(obj.get("feed")))
    if op == "unsubscribe":
        return ClientOp("unsubscribe", ref, feed=feed)
    cursor = obj.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        raise BadRequest("cursor must be a string returned by the server", feed=feed)
    backlog = obj.get("backlog", 0)
    if isinstance(backlog, bool) or not isinstance(backlog, int) or not 0 <= backlog <= max_backlog:
        raise BadRequest(f"backlog must be an integer from 0 to {max_backlog}", feed=feed)
    return ClientOp("subscribe", ref, feed=feed, cursor=cursor, backlog=backlog)


def _with_ref(frame: dict[str, Any], ref: Ref) -> dict[str, Any]:
    if ref is not None:
        frame["ref"] = ref
    return frame


def ok_frame(ref: Ref) -> bytes:
    return orjson.dumps(_with_ref({"op": "ok"}, ref))


def pong_frame(ref: Ref) -> bytes:
    return orjson.dumps(_with_ref({"op": "pong"}, ref))


def subscribed_frame(ref: Ref, feed: str, cursor: str, gap: bool) -> bytes:
    return orjson.dumps(_with_ref({"op": "subscribed", "feed": feed, "cursor": cursor, "gap": gap}, ref))


def unsubscribed_frame(ref: Ref, feed: str) -> bytes:
    return orjson.dumps(_with_ref({"op": "unsubscribed", "feed": feed}, ref))


def error_frame(err: StreamdError) -> bytes:
    return orjson.dumps(err.frame())


def heartbeat_frame(ts_ms: int) -> bytes:
    return b'{"op":"heartbeat","ts":%d}' % ts_ms


# Item frames are assembled from pre-encoded parts: the post JSON is encoded
# once by the fan-out worker and reused for every feed and every subscriber.
# Feed names and cursors contain no characters that need JSON escaping.


def post_frame(feed: str, cursor: str, post_json: bytes) -> bytes:
    return b'{"op":"post","feed":"%s","cursor":"%s","post":%s}' % (feed.encode(), cursor.encode(), post_json)


def delete_frame(feed: str, cursor: str, post_id: str) -> bytes:
    return b'{"op":"delete","feed":"%s","cursor":"%s","post_id":"%s"}' % (
        feed.encode(),
        cursor.encode(),
        post_id.encode(),
    )
