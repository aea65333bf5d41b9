from __future__ import annotations

import pytest

from streamd.errors import BadRequest
from streamd.feeds import Feed, expand, parse_feed


@pytest.mark.parametrize(
    "text, kind, name",
    [
        ("user:alice", "user", "alice"),
        ("user:a_1", "user", "a_1"),
        ("user:" + "x" * 32, "user", "x" * 32),
        ("event:derby-2026", "event", "derby-2026"),
        ("event:0", "event", "0"),
        ("list:Ab3_-x", "list", "Ab3_-x"),
    ],
)
def test_parse_valid(text: str, kind: str, name: str) -> None:
    feed = parse_feed(text)
    assert feed == Feed(kind, name)
    assert str(feed) == text


@pytest.mark.parametrize(
    "text",
    [
        "alice",
        "user:",
        "user:Alice",
        "user:" + "x" * 33,
        "user:al ice",
        "event:-derby",
        "event:Derby",
        "event:" + "a" * 65,
        "list:",
        "list:a/b",
        "planet:mars",
        ":alice",
        42,
        None,
    ],
)
def test_parse_invalid(text: object) -> None:
    with pytest.raises(BadRequest):
        parse_feed(text)


def test_visibility_by_kind() -> None:
    assert parse_feed("user:a").public and parse_feed("event:a").public
    assert not parse_feed("list:a").public


@pytest.mark.parametrize(
    "author, events, lists, expected",
    [
        ("alice", [], [], ["user:alice"]),
        ("alice", ["derby-2026"], [], ["user:alice", "event:derby-2026"]),
        ("alice", ["b", "a", "b"], ["l2", "l1"], ["user:alice", "list:l1", "list:l2", "event:a", "event:b"]),
    ],
)
def test_expand(author: str, events: list[str], lists: list[str], expected: list[str]) -> None:
    assert expand(author, events, lists) == expected
