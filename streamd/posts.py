"""Posts: validating a new post, and building the post object from an ingest entry.

The ingest stream entry holds the author (`a`) and the body (`d`: text, events,
media as JSON); the post's id is the entry id and `created_at` its millisecond
part, so the post is fully determined by the entry and every process builds
the same bytes from it.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from streamd.errors import BadRequest
from streamd.feeds import valid_slug
from streamd.settings import Settings

MEDIA_TYPES = frozenset({"image", "video", "audio", "link"})
MAX_URL_CHARS = 2048
MAX_IDEMPOTENCY_KEY_CHARS = 128
_POST_FIELDS = frozenset({"text", "events", "media", "idempotency_key"})


@dataclass(frozen=True, slots=True)
class NewPost:
    text: str
    events: list[str]
    media: list[dict[str, str]]
    idempotency_key: str | None = None

    def body_json(self) -> bytes:
        return orjson.dumps({"text": self.text, "events": self.events, "media": self.media})

    def idempotency_digest(self) -> str | None:
        if self.idempotency_key is None:
            return None
        return hashlib.sha256(self.idempotency_key.encode()).hexdigest()[:32]


def validate_new_post(body: Any, settings: Settings) -> NewPost:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = body.keys() - _POST_FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    text = body.get("text")
    if not isinstance(text, str):
        raise BadRequest("text is required and must be a string")
    if not text.strip():
        raise BadRequest("text must not be blank")
    if len(text) > settings.max_text_chars:
        raise BadRequest(f"text is longer than {settings.max_text_chars} characters")
    return NewPost(
        text=text,
        events=_validate_events(body.get("events", []), settings.max_events),
        media=_validate_media(body.get("media", []), settings.max_media),
        idempotency_key=_validate_idempotency_key(body.get("idempotency_key")),
    )


def _validate_events(events: Any, limit: int) -> list[str]:
    if not isinstance(events, list):
        raise BadRequest("events must be a list of event slugs")
    if len(events) > limit:
        raise BadRequest(f"at most {limit} events per post")
    out: list[str] = []
    for slug in events:
        if not valid_slug(slug):
            raise BadRequest(f"invalid event slug {str(slug)[:80]!r}: use [a-z0-9][a-z0-9-]{{0,63}}")
        if slug not in out:  # a repeated tag names the same feed once
            out.append(slug)
    return out


def _validate_media(media: Any, limit: int) -> list[dict[str, str]]:
    if not isinstance(media, list):
        raise BadRequest("media must be a list of {url, type} objects")
    if len(media) > limit:
        raise BadRequest(f"at most {limit} media entries per post")
    out = []
    for entry in media:
        if not isinstance(entry, dict) or entry.keys() != {"url", "type"}:
            raise BadRequest("each media entry must be an object with exactly url and type")
        url, kind = entry["url"], entry["type"]
        if not isinstance(url, str) or len(url) > MAX_URL_CHARS or not _is_https(url):
            raise BadRequest("media url must be an https URL of at most 2048 characters")
        if kind not in MEDIA_TYPES:
            raise BadRequest(f"media type must be one of {', '.join(sorted(MEDIA_TYPES))}")
        out.append({"url": url, "type": kind})
    return out


def _is_https(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname) and not any(c.isspace() for c in url)


def _validate_idempotency_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise BadRequest(f"idempotency_key must be a string of 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    return key


def ingest_shard(author: str, shards: int) -> int:
    """All of one author's posts go through one ingest shard (stable across processes)."""
    return zlib.crc32(author.encode()) % shards if shards > 1 else 0


POST_ID_RE = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def post_id_for(entry_id: str, shard: int, shards: int) -> str:
    """The post id of an ingest entry: unique across shards (the sequence part
    encodes the shard), time-ordered, and the entry id itself with one shard."""
    if shards == 1:
        return entry_id
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) * shards + shard}"


def shard_of_post(post_id: str, shards: int) -> int:
    return int(post_id.partition("-")[2]) % shards


def valid_post_id(post_id: str) -> bool:
    return POST_ID_RE.fullmatch(post_id) is not None


def build_post(post_id: str, author: str, body_json: bytes | str) -> dict[str, Any]:
    body = orjson.loads(body_json)
    return {
        "id": post_id,
        "author": author,
        "text": body["text"],
        "events": body["events"],
        "media": body["media"],
        "created_at": int(post_id.partition("-")[0]),
    }
