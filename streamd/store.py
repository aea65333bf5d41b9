"""The Redis client and the Lua scripts, created once per process."""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from streamd.settings import Settings


def connect(url: str, settings: Settings) -> aioredis.Redis:
    """A pooled client. The pool is bounded, and a burst past it waits for a
    free connection (up to 5 s) instead of failing: a reconnect storm makes
    thousands of concurrent subscribes."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_pool_size,
        timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def _load(name: str) -> str:
    return resources.files("streamd").joinpath("scripts", name).read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every Lua script, loaded once per client (`scripts/<name>.lua`)."""

    feed_append: AsyncScript
    feed_delete: AsyncScript
    feed_remove: AsyncScript
    ingest_post: AsyncScript
    post_delete: AsyncScript
    list_member: AsyncScript
    list_clear: AsyncScript
    token_use: AsyncScript

    @classmethod
    def register(cls, client: aioredis.Redis) -> Scripts:
        return cls(**{f.name: client.register_script(_load(f"{f.name}.lua")) for f in fields(cls)})
