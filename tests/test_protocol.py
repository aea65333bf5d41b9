from __future__ import annotations

import orjson
import pytest

from streamd.errors import BadRequest, NotFound
from streamd.protocol import (
    ClientOp,
    delete_frame,
    error_frame,
    heartbeat_frame,
    parse_client_frame,
    post_frame,
    subscribed_frame,
)


@pytest.mark.parametrize(
    "frame, expected",
    [
        ({"op": "ping"}, ClientOp("ping")),
        ({"op": "ping", "ref": "a"}, ClientOp("ping", "a")),
        ({"op": "ping", "ref": 7}, ClientOp("ping", 7)),
        ({"op": "auth", "token": "t", "ref": 1}, ClientOp("auth", 1, token="t")),
        ({"op": "subscribe", "feed": "user:a"}, ClientOp("subscribe", feed="user:a")),
        (
            {"op": "subscribe", "feed": "event:x", "cursor": "e.1-0", "backlog": 100},
            ClientOp("subscribe", feed="event:x", cursor="e.1-0", backlog=100),
        ),
        ({"op": "unsubscribe", "feed": "list:abc", "ref": 2}, ClientOp("unsubscribe", 2, feed="list:abc")),
    ],
)
def test_parse_valid(frame: dict[str, object], expected: ClientOp) -> None:
    assert parse_client_frame(orjson.dumps(frame).decode()) == expected


@pytest.mark.parametrize(
    "text, ref",
    [
        ("", None),
        ("{", None),
        ('"ping"', None),
        ("[]", None),
        ('{"op": "ping", "ref": true}', None),
        ('{"op": "ping", "ref": [1]}', None),
        ('{"op": "ping", "ref": "' + "r" * 65 + '"}', None),
        ('{"ref": 3}', 3),
        ('{"op": "PING", "ref": 3}', 3),
        ('{"op": 5, "ref": 3}', 3),
        ('{"op": "ping", "ref": 3, "x": 1}', 3),
        ('{"op": "auth", "ref": 3}', 3),
        ('{"op": "auth", "token": 5, "ref": 3}', 3),
        ('{"op": "subscribe", "ref": 3}', 3),
        ('{"op": "subscribe", "feed": "user:A", "ref": 3}', 3),
        ('{"op": "subscribe", "feed": "user:a", "backlog": -1, "ref": 3}', 3),
        ('{"op": "subscribe", "feed": "user:a", "backlog": 101, "ref": 3}', 3),
        ('{"op": "subscribe", "feed": "user:a", "backlog": 1.5, "ref": 3}', 3),
        ('{"op": "subscribe", "feed": "user:a", "backlog": true, "ref": 3}', 3),
        ('{"op": "subscribe", "feed": "user:a", "cursor": 12, "ref": 3}', 3),
        ('{"op": "unsubscribe", "feed": "nope", "ref": 3}', 3),
    ],
)
def test_parse_invalid_carries_ref(text: str, ref: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_client_frame(text)
    assert info.value.ref == ref
    assert info.value.message


def test_backlog_limit_is_configurable() -> None:
    assert parse_client_frame('{"op":"subscribe","feed":"user:a","backlog":5}', max_backlog=5).backlog == 5
    with pytest.raises(BadRequest):
        parse_client_frame('{"op":"subscribe","feed":"user:a","backlog":6}', max_backlog=5)


def test_server_frames_are_protocol_json() -> None:
    post = orjson.dumps({"id": "1-0", "author": "a", "text": 'quote " and \\ ', "events": [], "media": []})
    assert orjson.loads(post_frame("user:a", "e.1-0", post)) == {
        "op": "post",
        "feed": "user:a",
        "cursor": "e.1-0",
        "post": orjson.loads(post),
    }
    assert orjson.loads(delete_frame("event:x", "e.2-0", "1-0")) == {
        "op": "delete",
        "feed": "event:x",
        "cursor": "e.2-0",
        "post_id": "1-0",
    }
    assert orjson.loads(subscribed_frame(None, "user:a", "0.0-0", False)) == {
        "op": "subscribed",
        "feed": "user:a",
        "cursor": "0.0-0",
        "gap": False,
    }
    assert orjson.loads(heartbeat_frame(123)) == {"op": "heartbeat", "ts": 123}
    assert orjson.loads(error_frame(NotFound("gone", feed="list:x", ref=4))) == {
        "op": "error",
        "code": "not_found",
        "message": "gone",
        "feed": "list:x",
        "ref": 4,
    }
