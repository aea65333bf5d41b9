"""Feed names and the fan-out expansion: which feeds a post reaches.

Pure functions, no I/O: the worker looks up list memberships and hands them in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from streamd.errors import BadRequest

HANDLE_RE = re.compile(r"[a-z0-9_]{1,32}")
SLUG_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
LIST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")

KINDS = ("user", "list", "event")
_PATTERNS = {"user": HANDLE_RE, "list": LIST_ID_RE, "event": SLUG_RE}


@dataclass(frozen=True, slots=True)
class Feed:
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def public(self) -> bool:
        """user: and event: feeds are always public; a list's depends on the list."""
        return self.kind != "list"


def parse_feed(text: object) -> Feed:
    """`user:<handle>`, `list:<id>` or `event:<slug>`, else BadRequest."""
    if not isinstance(text, str):
        raise BadRequest("feed must be a string like 'user:alice'")
    kind, sep, name = text.partition(":")
    pattern = _PATTERNS.get(kind)
    if not sep or pattern is None:
        raise BadRequest(f"unknown feed kind in {text[:80]!r}: use user:, list: or event:")
    if not pattern.fullmatch(name):
        raise BadRequest(f"invalid {kind} name in feed {text[:80]!r}")
    return Feed(kind, name)


def valid_handle(handle: object) -> bool:
    return isinstance(handle, str) and HANDLE_RE.fullmatch(handle) is not None


def valid_slug(slug: object) -> bool:
    return isinstance(slug, str) and SLUG_RE.fullmatch(slug) is not None


def expand(author: str, events: Iterable[str] = (), lists: Iterable[str] = ()) -> list[str]:
    """Every feed a post reaches: its author's, each list the author is in, each event.

    Order is stable and duplicates are removed, so a redelivered post plans the
    same writes.
    """
    out = [f"user:{author}"]
    out.extend(f"list:{list_id}" for list_id in sorted(set(lists)))
    out.extend(f"event:{slug}" for slug in sorted(set(events)))
    return out
