"""Posting from a trusted backend straight through Redis, without HTTP.

    async with Publisher.open("redis://10.0.0.5/0") as publisher:
        post, created = await publisher.post("racing_desk", {"text": "Off!", "events": ["ascot-r3"]})

A backend that already holds a Redis connection (a race-results importer, a
CMS) publishes the way python-socketio's write-only manager or socket.io's
Redis emitter do: no token, no per-minute budget, no HTTP round trip. The rest
is `POST /v1/posts` exactly: the same body validation (`BadRequest` with the
same messages), the author's lists as they are when the post is accepted,
and the same `ingest_post.lua` (`ingest.Acceptance`; on one server
`ingest_fanout.lua`, which checks the lists remembered from the author's last
post: one round trip a post), so the post is stored, fanned out,
deduplicated by its idempotency key and deletable like any other. The author
must be a user (`NotFound` otherwise).

The settings that shape what is stored (`ingest_shards`, retention,
idempotency TTL, `wait_replicas`, the post limits) must be those of the
deployment: `Settings.from_env()` reads the same `STREAMD_*` variables.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from streamd import keys, store
from streamd.auth import valid_handle
from streamd.autopipe import AutoPipeline
from streamd.errors import NotFound
from streamd.ingest import Acceptance
from streamd.lists import Lists
from streamd.posts import validate_new_post
from streamd.settings import Settings
from streamd.store import AnyRedis, Scripts

KNOWN_AUTHORS = 65_536  # users are never deleted: an author seen once needs no second look


class Publisher:
    """Accepts posts for authors named by the caller. Safe to share between tasks."""

    def __init__(self, client: AnyRedis, settings: Settings, fast: AutoPipeline | None = None) -> None:
        scripts = Scripts.register(client)
        self._redis = client
        self._settings = settings
        self._fast = fast
        self._lists = Lists(client, scripts, settings, fast=fast)
        self._acceptance = Acceptance(client, scripts, settings, fast)
        self._known: set[str] = set()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, redis_url: str, settings: Settings | None = None) -> AsyncIterator[Publisher]:
        """A publisher on its own connections to `redis_url` (one server or a Cluster), closed on exit."""
        settings = settings if settings is not None else Settings.from_env()
        client = await store.open_client(redis_url, settings)
        fast = AutoPipeline.for_client(client) if isinstance(client, aioredis.Redis) else None
        try:
            yield cls(client, settings, fast)
        finally:
            if fast is not None:
                await fast.aclose()
            await store.close(client)

    async def post(self, author: str, body: Any) -> tuple[dict[str, Any], bool]:
        """The post as `POST /v1/posts` answers it, and whether it is new
        (False: an idempotent repeat of an earlier post by `author`)."""
        new = validate_new_post(body, self._settings)
        if author not in self._known:
            # Once per author: users are never deleted.
            key = keys.user(author)
            exists = valid_handle(author) and await (
                self._fast.execute("EXISTS", key) if self._fast is not None else self._redis.exists(key)
            )
            if not exists:
                raise NotFound(f"no user {author!r}")
            if len(self._known) >= KNOWN_AUTHORS:
                self._known.clear()
            self._known.add(author)
        # Remembered lists cost no round trip: the accepting script checks them
        # against the author's lists now and answers with those if they differ.
        lists = self._acceptance.lists_seen(author)
        if lists is None:
            lists = await self._lists.memberships(author)
        return await self._acceptance.store(author, new, lists)
