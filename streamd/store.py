"""The Redis client and the Lua scripts, created once per process.

`open_client` gives a client for one Redis server or, when the URL names a
node of a Redis Cluster, for the cluster (`cluster.py`): the rest of streamd
uses either the same way. Everything that differs under Cluster is here or
in `cluster.py` and `live.py`: sharded publishing (SPUBLISH), scripts in
cluster pipelines, and waiting for replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, Final, TypeAlias, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamd import cluster
from streamd.settings import Settings

AnyRedis: TypeAlias = aioredis.Redis | RedisCluster
AnyPipeline: TypeAlias = Pipeline | ClusterPipeline

# Errors that say "Redis is not answering right now", not "this request is
# wrong": the answer is 503 and the work is retried. Under Cluster a failover
# or a slot migration adds its own (CLUSTERDOWN, TRYAGAIN, a MOVED or ASK past
# the client's retries, READONLY from a demoted master, no reachable node).
# Final and not annotated: mypy then keeps the tuple's exact members, and
# `except (*TRANSIENT_ERRORS, OtherError)` type-checks; from a
# `tuple[type[Exception], ...]` it would infer a tuple of plain `type`.
TRANSIENT_ERRORS: Final = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,
    TryAgainError,
    AskError,
    ReadOnlyError,
    RedisClusterException,
)


# Every client here is made without `decode_responses`, so a bulk string
# reply is bytes; redis-py types replies for either setting (`bytes | str`).
# These narrow a reply to what this client gets, and fail loudly if a client
# ever decodes. Error messages name the type only: a reply may be a secret.

StreamEntry: TypeAlias = tuple[bytes, dict[bytes, bytes]]
"""One entry of XRANGE or XREVRANGE: its id and its fields."""


def as_bytes(reply: object) -> bytes:
    """A bulk string reply that cannot be nil."""
    if isinstance(reply, bytes):
        return reply
    raise TypeError(f"expected a bulk string reply (bytes), got {type(reply).__name__}")


def as_text(reply: object) -> str:
    """A bulk string reply holding UTF-8 text: an id, a handle, a digest."""
    return as_bytes(reply).decode()


def as_texts(replies: Iterable[object]) -> list[str]:
    """The members of a set or sorted set, the items of a list, as text."""
    return [as_text(reply) for reply in replies]


def as_entries(reply: object) -> list[StreamEntry]:
    """The reply of XRANGE or XREVRANGE."""
    if not isinstance(reply, list):
        raise TypeError(f"expected a list of stream entries, got {type(reply).__name__}")
    for entry in reply:
        # The shape only, not every field: the fields are bytes for the same
        # reason as the id, and this runs on every page of a feed.
        if not (
            isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], bytes) and isinstance(entry[1], dict)
        ):
            raise TypeError(f"expected a stream entry (id, fields), got {type(entry).__name__}")
    return cast("list[StreamEntry]", reply)


def urls_of(setting: str) -> list[str]:
    """`STREAMD_REDIS_URL` may list several nodes of one cluster, comma-separated."""
    return [u.strip() for u in setting.split(",") if u.strip()]


def connect(url: str, settings: Settings) -> aioredis.Redis:
    """A pooled client for one Redis server. The pool is bounded, and a burst
    past it waits for a free connection (up to 5 s) instead of failing: a
    reconnect storm makes thousands of concurrent subscribes."""
    pool = aioredis.BlockingConnectionPool.from_url(
        urls_of(url)[0],
        max_connections=settings.redis_pool_size,
        timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


async def open_client(url: str, settings: Settings) -> AnyRedis:
    """The client for `url`: a cluster client when it names a Redis Cluster node
    (`redis_cluster` None: ask the node; an unreachable node is taken for a
    single server, with a warning), else `connect`."""
    urls = urls_of(url)
    wanted = settings.redis_cluster
    if wanted is None:
        wanted = await cluster.detect(urls)
    if wanted:
        return cluster.connect(urls, settings)
    return connect(url, settings)


async def close(client: AnyRedis) -> None:
    """Close the client and all its connections (at shutdown)."""
    if isinstance(client, cluster.StreamdCluster):
        await client.close_all()
    else:
        await client.aclose()


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)


async def answers(client: AnyRedis, timeout: float) -> bool:
    """Whether Redis answers a PING within `timeout`. Under Cluster, any master
    will do: one master failing over must not make every gateway unready."""
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
            primaries = client.get_primaries()
            pings = [asyncio.ensure_future(client.ping(target_nodes=node)) for node in primaries]
            try:
                for next_done in asyncio.as_completed(pings, timeout=timeout):
                    try:
                        if await next_done:
                            return True
                    except (*TRANSIENT_ERRORS, RedisError):
                        continue
                return False
            finally:
                for ping in pings:
                    ping.cancel()
        return bool(await asyncio.wait_for(client.ping(), timeout))
    except (*TRANSIENT_ERRORS, RedisError, TimeoutError):
        return False


async def publish(client: AnyRedis, channel: str, message: bytes) -> None:
    """PUBLISH, or SPUBLISH under Cluster: the channel lives in its hash tag's slot."""
    if isinstance(client, RedisCluster):
        await client.spublish(channel, message)
    else:
        await client.publish(channel, message)


class NotReplicated(RedisTimeoutError):
    """Fewer replicas than `wait_replicas` confirmed a write in time."""


class Replicas:
    """`WAIT` for replicas after writes (`wait_replicas`), on the connections
    that made them: WAIT counts the writes of its own connection, so it goes
    in the same pipeline, after the writes, once per node written to."""

    def __init__(self, client: AnyRedis, settings: Settings) -> None:
        self._client = client
        self._count = settings.wait_replicas
        self._timeout_ms = settings.wait_timeout_ms

    async def plan(self, written: Iterable[str]) -> Wait:
        """The WAITs for writes to the keys `written` (one key per write is enough:
        each write stays in one slot)."""
        if self._count <= 0:
            return Wait(self._count, self._timeout_ms, [], {})
        client = self._client
        if not isinstance(client, RedisCluster):
            return Wait(self._count, self._timeout_ms, [None], {})
        await client.initialize()  # the slot table, if no command has loaded it yet
        owners = {key: client.get_node_from_key(key) for key in set(written)}
        nodes = list({node.name: node for node in owners.values() if node is not None}.values())
        return Wait(self._count, self._timeout_ms, nodes, {k: n.name for k, n in owners.items() if n is not None}, client)


class Wait:
    def __init__(
        self,
        count: int,
        timeout_ms: int,
        nodes: Sequence[ClusterNode | None],
        owners: dict[str, str],
        client: RedisCluster | None = None,
    ) -> None:
        self._count = count
        self._timeout_ms = timeout_ms
        self._nodes = nodes
        self._owners = owners
        self._client = client

    def __len__(self) -> int:
        return len(self._nodes)

    def queue(self, pipe: AnyPipeline) -> None:
        """Append the WAITs; call after queuing the writes."""
        for node in self._nodes:
            options = {} if node is None else {"target_nodes": node}
            pipe.execute_command("WAIT", self._count, self._timeout_ms, **options)

    def check(self, replies: Sequence[Any]) -> None:
        """NotReplicated unless every WAIT saw enough replicas, and (under
        Cluster) every written slot stayed where it was: a write redirected to
        another node was not covered by that node's WAIT."""
        for reply in replies:
            if isinstance(reply, Exception):
                raise NotReplicated(f"WAIT failed: {reply}")
            if int(reply) < self._count:
                raise NotReplicated(f"{reply} of {self._count} replicas confirmed the write within {self._timeout_ms} ms")
        if self._client is not None:
            for key, name in self._owners.items():
                node = self._client.get_node_from_key(key)
                if node is None or node.name != name:
                    raise NotReplicated(f"the slot of {key} moved during the write")


_INCLUDE = "--! include "


def _load(name: str) -> str:
    """A script's text, with each `--! include <file>` line replaced by that file."""
    text = resources.files("streamd").joinpath("scripts", name).read_text()
    return "".join(
        _load(line[len(_INCLUDE) :].strip()) if line.startswith(_INCLUDE) else line
        for line in text.splitlines(keepends=True)
    )


class Script:
    """One Lua script. The scripts publish with the command named by the Lua
    variable PUBLISH, defined here: SPUBLISH under Cluster (the channel shares
    the slot of the keys the script writes), PUBLISH otherwise."""

    __slots__ = ("text", "_script")

    def __init__(self, client: AnyRedis, text: str) -> None:
        publish = "SPUBLISH" if is_cluster(client) else "PUBLISH"
        self.text = f"local PUBLISH = '{publish}'\n{text}"
        self._script: AsyncScript = client.register_script(self.text)

    @property
    def sha(self) -> str:
        return self._script.sha

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: AnyRedis | AnyPipeline | None = None
    ) -> Any:
        if isinstance(client, ClusterPipeline):
            # A cluster pipeline has no `evalsha` method; the raw command is
            # routed by its keys like any other. A NOSCRIPT (a new master after
            # a failover has no scripts) comes back as this command's result:
            # see `Scripts.run`.
            client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            return client
        return await self._script(keys=list(keys), args=list(args), client=client)


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every Lua script, loaded once per client (`scripts/<name>.lua`)."""

    feed_append: Script
    feed_delete: Script
    feed_remove: Script
    feed_snapshot: Script
    ingest_post: Script
    ingest_fanout: Script
    post_delete: Script
    post_delete_fanout: Script
    list_member: Script
    list_clear: Script
    token_use: Script
    fanout_lease: Script

    @classmethod
    def register(cls, client: AnyRedis) -> Scripts:
        return cls(**{f.name: Script(client, _load(f"{f.name}.lua")) for f in fields(cls)})

    async def load(self, client: AnyRedis) -> None:
        """SCRIPT LOAD every script (under Cluster, on every master)."""
        for f in fields(self):
            await client.script_load(getattr(self, f.name).text)

    async def run(self, client: AnyRedis, build: Callable[[AnyPipeline], Awaitable[None]]) -> list[Any]:
        """Queue commands with `build` on a fresh pipeline and execute it; the
        results, errors included.

        A plain pipeline loads missing scripts itself. A cluster pipeline
        cannot: a master that lost its script cache (restarted, or a replica
        just promoted: Redis does not replicate SCRIPT LOAD) answers NOSCRIPT.
        Then every script is loaded and the pipeline built and run once more,
        which is safe for streamd's scripts: each one skips work already done.
        """
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            await build(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            if attempt or not any(isinstance(r, NoScriptError) for r in results):
                break
            await self.load(client)
        return results
