"""Curated lists: records, members and the reverse index used by fan-out.

A list record lives in its own slot; its member set and every user's
member-of set share the slot `{m}`, so a membership change updates both in
one script. Deleting a list first tombstones its feed (nothing more is
appended, subscribers are told), then clears the memberships, then the record:
each step can be retried.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable
from typing import Any

import orjson

from streamd import keys, store
from streamd.access import can_manage_list, can_read, can_view_list
from streamd.auth import Principal
from streamd.autopipe import AutoPipeline
from streamd.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from streamd.feeds import LIST_ID_RE, parse_feed
from streamd.protocol import error_frame
from streamd.settings import Settings
from streamd.store import AnyRedis, Scripts

MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 500
VISIBILITIES = ("public", "private")
_FIELDS = frozenset({"name", "description", "visibility"})


def validate_list_fields(body: Any, *, partial: bool) -> dict[str, str]:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = body.keys() - _FIELDS
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    if partial and not body:
        raise BadRequest("nothing to change: send name, description or visibility")
    out: dict[str, str] = {}
    if "name" in body or not partial:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise BadRequest(f"name must be a non-blank string of at most {MAX_NAME_CHARS} characters")
        out["name"] = name
    if "description" in body or not partial:
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise BadRequest(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
        out["description"] = description
    if "visibility" in body or not partial:
        visibility = body.get("visibility")
        if visibility not in VISIBILITIES:
            raise BadRequest("visibility must be 'public' or 'private'")
        out["visibility"] = visibility
    return out


class Lists:
    def __init__(self, client: AnyRedis, scripts: Scripts, settings: Settings, fast: AutoPipeline | None = None) -> None:
        self._redis = client
        self._fast = fast
        self._scripts = scripts
        self._settings = settings

    async def record(self, list_id: str) -> dict[str, Any] | None:
        if not LIST_ID_RE.fullmatch(list_id):
            return None
        raw = await self._redis.get(keys.list_record(list_id))
        return None if raw is None else orjson.loads(raw)

    async def readable(self, who: Principal | None, list_id: str) -> dict[str, Any]:
        """The list record if `who` may see the list; NotFound otherwise (never
        Forbidden: a private list does not leak its existence)."""
        record = await self.record(list_id)
        if record is None or not can_view_list(who, record):
            raise NotFound(f"no list {list_id!r}", feed=f"list:{list_id}")
        return record

    async def check_feed_readable(self, who: Principal | None, feed: str) -> None:
        parsed = parse_feed(feed)
        if parsed.kind == "list":
            record = await self.record(parsed.name)
            if record is None or not can_read(who, parsed, record):
                raise NotFound(f"no list {parsed.name!r}", feed=feed)

    async def managed(self, who: Principal | None, list_id: str) -> dict[str, Any]:
        """The record if `who` may change the list; NotFound if they may not see it."""
        if who is not None and who.kind == "embed":
            # Refused on the token alone, before the lookup: it reveals nothing.
            raise Forbidden("embed tokens are read-only")
        record = await self.readable(who, list_id)
        if who is None:
            raise Unauthorized("this needs the owner's token")
        if not can_manage_list(who, record):
            raise Forbidden("only the list's owner or admin may change it")
        return record

    async def view(self, record: dict[str, Any]) -> dict[str, Any]:
        members = sorted(store.as_texts(await self._redis.smembers(keys.list_members(record["id"]))))
        return {**record, "members": members}

    async def create(self, owner: str, body: Any) -> dict[str, Any]:
        fields = validate_list_fields(body, partial=False)
        if await self._redis.zcard(keys.lists_owned(owner)) >= self._settings.max_lists_per_user:
            raise Conflict(f"a user may own at most {self._settings.max_lists_per_user} lists")
        list_id = secrets.token_urlsafe(8)
        now = int(time.time() * 1000)
        record = {"id": list_id, "owner": owner, **fields, "created_at": now}
        if not await self._redis.set(keys.list_record(list_id), orjson.dumps(record), nx=True):
            raise Conflict("list id collision, try again")
        await self._redis.zadd(keys.lists_owned(owner), {list_id: now})
        return record

    async def update(self, record: dict[str, Any], body: Any) -> dict[str, Any]:
        changes = validate_list_fields(body, partial=True)
        updated = {**record, **changes}
        await self._redis.set(keys.list_record(record["id"]), orjson.dumps(updated), xx=True)
        if record["visibility"] == "public" and updated["visibility"] == "private":
            # Gateways re-check every live reader of the feed.
            feed = f"list:{record['id']}"
            await store.publish(self._redis, keys.feed_channel(feed), b"!acl")
        return updated

    async def delete(self, record: dict[str, Any]) -> None:
        list_id = record["id"]
        feed = f"list:{list_id}"
        gone = error_frame(NotFound("this list was deleted", feed=feed))
        await self._scripts.feed_remove(
            keys=keys.feed_keys(feed),
            args=[keys.feed_channel(feed), gone],
        )
        await self._scripts.list_clear(keys=[keys.list_members(list_id)], args=[list_id, keys.member_of("")])
        await self._redis.delete(keys.list_record(list_id))
        await self._redis.zrem(keys.lists_owned(record["owner"]), list_id)

    async def set_member(self, record: dict[str, Any], handle: str, present: bool) -> None:
        result = await self._scripts.list_member(
            keys=[keys.list_members(record["id"]), keys.member_of(handle)],
            args=["add" if present else "remove", record["id"], handle, self._settings.max_list_members],
        )
        if result == -1:
            raise Conflict(f"a list may have at most {self._settings.max_list_members} members")

    async def owned_by(self, handle: str, who: Principal | None) -> list[dict[str, Any]]:
        ids = store.as_texts(await self._redis.zrange(keys.lists_owned(handle), 0, -1))
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for list_id in ids:  # one slot each: a pipeline, not MGET
                pipe.get(keys.list_record(list_id))
            raws = await pipe.execute()
        records = [orjson.loads(raw) for raw in raws if raw is not None]
        return [await self.view(r) for r in records if can_view_list(who, r)]

    async def memberships(self, handle: str) -> list[str]:
        """The lists a user is in now: read at accept time, so a post reaches them."""
        return sorted_members(await self.read_memberships(handle))

    def read_memberships(self, handle: str) -> Awaitable[Any]:
        """SMEMBERS of the user's lists: sent at once on the auto-pipeline, else
        when awaited; `sorted_members` of the reply."""
        if self._fast is not None:
            return self._fast.execute("SMEMBERS", keys.member_of(handle))
        return self._redis.smembers(keys.member_of(handle))


def sorted_members(reply: Any) -> list[str]:
    return sorted(m.decode() for m in reply)
