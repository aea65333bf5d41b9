"""Pure pieces of authorization: read rules, embed tokens, buckets, list fields."""

from __future__ import annotations

from typing import Any

import pytest

from streamd.access import can_manage_list, can_read, can_view_list
from streamd.auth import ADMIN, Principal, sign_embed_token, verify_embed_token
from streamd.errors import BadRequest
from streamd.feeds import Feed
from streamd.lists import validate_list_fields
from streamd.ratelimit import Bucket, KeyedLimiter

OWNER = Principal("user", "owner", "t1")
OTHER = Principal("user", "other", "t2")
EMBED_L1 = Principal("embed", "owner", feed="list:l1", expires_at=2e9)
EMBED_L2 = Principal("embed", "owner", feed="list:l2", expires_at=2e9)
PUBLIC = {"id": "l1", "owner": "owner", "visibility": "public"}
PRIVATE = {"id": "l1", "owner": "owner", "visibility": "private"}


@pytest.mark.parametrize(
    "who, feed, record, expected",
    [
        (None, Feed("user", "a"), None, True),
        (None, Feed("event", "a"), None, True),
        (None, Feed("list", "l1"), None, False),
        (ADMIN, Feed("list", "l1"), None, False),
        (None, Feed("list", "l1"), PUBLIC, True),
        (None, Feed("list", "l1"), PRIVATE, False),
        (OTHER, Feed("list", "l1"), PRIVATE, False),
        (OWNER, Feed("list", "l1"), PRIVATE, True),
        (ADMIN, Feed("list", "l1"), PRIVATE, True),
        (EMBED_L1, Feed("list", "l1"), PRIVATE, True),
        (EMBED_L2, Feed("list", "l1"), PRIVATE, False),
    ],
)
def test_can_read(who: Principal | None, feed: Feed, record: dict[str, Any] | None, expected: bool) -> None:
    assert can_read(who, feed, record) is expected


def test_can_view_list_is_not_widened_by_embed_tokens() -> None:
    assert can_view_list(None, PUBLIC) and can_view_list(OWNER, PRIVATE) and can_view_list(ADMIN, PRIVATE)
    assert not can_view_list(EMBED_L1, PRIVATE)  # reads the feed, not the list
    assert not can_view_list(OTHER, PRIVATE) and not can_view_list(None, PRIVATE)


def test_can_manage_list() -> None:
    assert can_manage_list(OWNER, PRIVATE) and can_manage_list(ADMIN, PRIVATE)
    assert not can_manage_list(OTHER, PUBLIC)
    assert not can_manage_list(EMBED_L1, PUBLIC)
    assert not can_manage_list(None, PUBLIC)


def test_embed_token_roundtrip_and_tampering() -> None:
    secret = b"s" * 32
    token = sign_embed_token(secret, "list:l1", "owner", 2_000_000_000)
    who = verify_embed_token(secret, token, now=1_000_000_000)
    assert who == Principal("embed", "owner", feed="list:l1", expires_at=2_000_000_000.0)
    assert verify_embed_token(secret, token, now=2_000_000_000) is None  # expired
    assert verify_embed_token(b"t" * 32, token, now=0) is None  # another secret
    payload, mac = token.removeprefix("sde_").split(".")
    forged = sign_embed_token(b"x", "list:l2", "owner", 2_000_000_000).removeprefix("sde_").split(".")[0]
    assert verify_embed_token(secret, f"sde_{forged}.{mac}", now=0) is None
    assert verify_embed_token(secret, "sde_garbage", now=0) is None
    assert verify_embed_token(secret, "sde_a.b", now=0) is None


def test_bucket_refills() -> None:
    b = Bucket.full(rate=2.0, burst=2, now=0.0)
    assert [b.take(0.0), b.take(0.0), b.take(0.0)] == [True, True, False]
    assert b.take(0.5) and not b.take(0.5)


def test_keyed_limiter_is_bounded() -> None:
    limiter = KeyedLimiter(rate=0.0, burst=1, max_keys=3)
    assert limiter.allow("a", 0) and not limiter.allow("a", 0)
    for key in "bcd":
        assert limiter.allow(key, 0)
    assert len(limiter) == 3
    assert limiter.allow("a", 0)  # "a" was forgotten: the table never grows past its bound


@pytest.mark.parametrize(
    "body, partial",
    [
        ({"name": "x"}, False),
        ({"name": "x", "visibility": "friends"}, False),
        ({"name": " ", "visibility": "public"}, False),
        ({"name": "x", "visibility": "public", "description": "d" * 501}, False),
        ({}, True),
        ({"colour": "red"}, True),
        ([], True),
    ],
)
def test_list_fields_invalid(body: Any, partial: bool) -> None:
    with pytest.raises(BadRequest):
        validate_list_fields(body, partial=partial)


def test_list_fields_valid() -> None:
    assert validate_list_fields({"name": "n", "visibility": "private"}, partial=False) == {
        "name": "n",
        "description": "",
        "visibility": "private",
    }
    assert validate_list_fields({"description": "d"}, partial=True) == {"description": "d"}
