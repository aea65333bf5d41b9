from __future__ import annotations

from typing import Any

import orjson
import pytest

from streamd.errors import BadRequest
from streamd.posts import build_post, ingest_shard, validate_new_post
from streamd.settings import Settings

S = Settings()


def test_valid_post() -> None:
    new = validate_new_post(
        {
            "text": "Off at 3:15",
            "events": ["derby-2026", "derby-2026", "oaks"],
            "media": [{"url": "https://img.example/a.jpg", "type": "image"}],
            "idempotency_key": "k1",
        },
        S,
    )
    assert new.events == ["derby-2026", "oaks"]
    assert new.media == [{"url": "https://img.example/a.jpg", "type": "image"}]
    assert new.idempotency_digest() and new.idempotency_digest() != validate_new_post(
        {"text": "x", "idempotency_key": "k2"}, S
    ).idempotency_digest()
    body = orjson.loads(new.body_json())
    assert body == {"text": "Off at 3:15", "events": ["derby-2026", "oaks"], "media": new.media}


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "text",
        {},
        {"text": ""},
        {"text": "   "},
        {"text": 5},
        {"text": "x" * 1001},
        {"text": "x", "extra": 1},
        {"text": "x", "events": "derby"},
        {"text": "x", "events": ["Derby"]},
        {"text": "x", "events": ["-x"]},
        {"text": "x", "events": [f"e{i}" for i in range(11)]},
        {"text": "x", "media": {}},
        {"text": "x", "media": [{"url": "http://a.example/x", "type": "image"}]},
        {"text": "x", "media": [{"url": "javascript:alert(1)", "type": "image"}]},
        {"text": "x", "media": [{"url": "https://a.example/x", "type": "pdf"}]},
        {"text": "x", "media": [{"url": "https://a.example/x"}]},
        {"text": "x", "media": [{"url": "https://a.example/x", "type": "image", "alt": "y"}]},
        {"text": "x", "media": [{"url": "https://a.example/x", "type": "image"}] * 5},
        {"text": "x", "idempotency_key": ""},
        {"text": "x", "idempotency_key": 5},
        {"text": "x", "idempotency_key": "k" * 129},
    ],
)
def test_invalid_post(body: Any) -> None:
    with pytest.raises(BadRequest) as info:
        validate_new_post(body, S)
    assert info.value.code == "bad_request"


def test_limits_follow_settings() -> None:
    small = Settings(max_text_chars=5, max_events=1)
    validate_new_post({"text": "12345", "events": ["a"]}, small)
    with pytest.raises(BadRequest):
        validate_new_post({"text": "123456"}, small)
    with pytest.raises(BadRequest):
        validate_new_post({"text": "1", "events": ["a", "b"]}, small)


def test_text_length_counts_characters_not_bytes() -> None:
    validate_new_post({"text": "🏇" * 1000}, S)


def test_build_post_from_entry() -> None:
    body = orjson.dumps({"text": "t", "events": ["e"], "media": []})
    assert build_post("1732212345678-2", "alice", body) == {
        "id": "1732212345678-2",
        "author": "alice",
        "text": "t",
        "events": ["e"],
        "media": [],
        "created_at": 1732212345678,
    }


def test_ingest_shard_is_stable() -> None:
    assert ingest_shard("alice", 1) == 0
    assert ingest_shard("alice", 8) == ingest_shard("alice", 8)
    assert {ingest_shard(f"u{i}", 4) for i in range(100)} == {0, 1, 2, 3}
