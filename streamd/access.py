"""Who may read a feed: pure rules, given the caller and (for lists) the list."""

from __future__ import annotations

from typing import Any

from streamd.auth import Principal
from streamd.feeds import Feed


def can_read(who: Principal | None, feed: Feed, list_record: dict[str, Any] | None) -> bool:
    """user: and event: feeds are public. A list's feed needs the list to exist;
    a private one is readable by its owner, admin, and an embed token for it."""
    if feed.public:
        return True
    if list_record is None:
        return False
    if list_record["visibility"] == "public":
        return True
    if who is None:
        return False
    if who.is_admin:
        return True
    if who.kind == "user":
        return who.handle == list_record["owner"]
    return who.kind == "embed" and who.feed == str(feed)


def can_view_list(who: Principal | None, list_record: dict[str, Any]) -> bool:
    """A list's record and members: anyone if public; owner and admin if private.
    An embed token reads a private list's feed, not the list itself."""
    if list_record["visibility"] == "public":
        return True
    return who is not None and (who.is_admin or (who.kind == "user" and who.handle == list_record["owner"]))


def can_manage_list(who: Principal | None, list_record: dict[str, Any]) -> bool:
    return who is not None and (who.is_admin or (who.kind == "user" and who.handle == list_record["owner"]))
