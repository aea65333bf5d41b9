"""Redis Cluster: telling a cluster node from a single server, and the client for a cluster.

The client is redis-py's `RedisCluster` (slot table, MOVED/ASK, failover
re-discovery, pipelines split by node) with one change: a command waits for a
free connection instead of failing. redis-py's cluster pool raises
`MaxConnectionsError` once a node has `max_connections` connections in use,
and a reconnect storm of subscribes would hit that; here at most
`redis_pool_size` commands or pipelines are in flight per process, each using
at most one connection per node, so no node's pool is ever exhausted.

Live channels do not use this client's pools: `live.py` opens its own
connection to each master that owns a subscribed channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.maint_notifications import MaintNotificationsConfig
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamd.settings import Settings

log = logging.getLogger("streamd.cluster")

# Set inside a gated call: a command that the client itself issues while
# running another (a redirected pipeline command) does not wait a second time.
_INSIDE: ContextVar[bool] = ContextVar("streamd_cluster_gate", default=False)


async def detect(urls: list[str], timeout: float = 2.0) -> bool:
    """Whether the first node that answers has cluster mode enabled.

    No node answering counts as a single server, with a warning: set
    `STREAMD_REDIS_CLUSTER` to decide without asking (a gateway that starts
    while its seed node is down still gets the right client).
    """
    for url in urls:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            info = await client.info("cluster")
            return bool(info.get("cluster_enabled"))
        except (RedisConnectionError, RedisTimeoutError, OSError):
            continue
        finally:
            await client.aclose()
    log.warning(
        "redis at %s does not answer: taking it for a single server "
        "(set STREAMD_REDIS_CLUSTER=true or false to say which)",
        ", ".join(_redact(u) for u in urls),
    )
    return False


# The port of a Redis URL that names none (the redis:// scheme's default).
URL_DEFAULT_PORT = 6379


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or URL_DEFAULT_PORT}"


def connect(urls: list[str], settings: Settings) -> StreamdCluster:
    """A cluster client seeded with every given node (it discovers the rest).

    Credentials, TLS and timeouts come from the first URL."""
    kwargs: dict[str, Any] = dict(parse_url(urls[0]))
    kwargs.pop("db", None)  # a cluster has only database 0
    if kwargs.pop("connection_class", None) is not None:  # rediss://
        kwargs["ssl"] = True
    host, port = kwargs.pop("host", "127.0.0.1"), int(kwargs.pop("port", URL_DEFAULT_PORT))
    seeds = [ClusterNode(host, port)]
    for url in urls[1:]:
        extra = parse_url(url)
        seeds.append(ClusterNode(extra.get("host", "127.0.0.1"), int(extra.get("port", URL_DEFAULT_PORT))))
    return StreamdCluster(
        startup_nodes=seeds,
        in_flight=settings.redis_pool_size,
        # One connection per node per call in flight, plus a few for the
        # client's own slot-table refreshes.
        max_connections=settings.redis_pool_size + 4,
        socket_connect_timeout=5,
        # Maintenance push notifications are a Redis 8 / Enterprise feature;
        # Redis 7 refuses the handshake command for them.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **kwargs,
    )


class StreamdCluster(RedisCluster):
    """`RedisCluster` whose calls wait for a free connection instead of failing."""

    def __init__(self, *args: Any, in_flight: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Semaphore(in_flight)
        # Every node object the client has used, by identity (ClusterNode
        # compares by address): after a failover redis-py drops the object of
        # a node that left the slot table with connections still open, and
        # `close_all` closes those too.
        self._known: dict[int, ClusterNode] = {}

    def track_nodes(self) -> None:
        manager = self.nodes_manager
        for node in (*manager.nodes_cache.values(), *manager.startup_nodes.values()):
            self._known.setdefault(id(node), node)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if _INSIDE.get():
            return await super().execute_command(*args, **kwargs)
        async with self.gated():
            return await super().execute_command(*args, **kwargs)

    @contextlib.asynccontextmanager
    async def gated(self) -> AsyncIterator[None]:
        """Around one command or pipeline: the client initialised, a slot of
        the in-flight gate, and a connection redis-py closed under us reported
        as the lost connection it is."""
        if self._initialize:
            # Before RedisCluster.execute_command looks at its slot table and
            # command table: under a burst of first commands some would find
            # them half built, and a failed initialisation closes every
            # connection, those of the other commands in flight too.
            await self.initialize()
        async with self.gate:
            token = _INSIDE.set(True)
            try:
                yield
            except AttributeError as err:
                if (lost := _closed_under_us(err)) is None:
                    raise
                raise lost from err
            finally:
                _INSIDE.reset(token)
                self.track_nodes()

    # Not `shutdown`: that is redis-py's method for the SHUTDOWN command,
    # which stops the server.
    async def close_all(self) -> None:
        """Close every connection, for good (at shutdown).

        `aclose`, which redis-py also calls by itself to re-initialise after a
        MOVED or a lost node, does nothing to a client already marked for
        re-initialisation, and knows only the nodes in its current tables."""
        await self.aclose()
        self.track_nodes()
        known, self._known = list(self._known.values()), {}
        await asyncio.gather(*(node.disconnect() for node in known), return_exceptions=True)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # redis-py's command mixins declare `_event_dispatcher` in a Protocol,
        # which mypy takes for an abstract attribute; its own
        # `RedisCluster.pipeline` makes a ClusterPipeline the same way.
        return GatedPipeline(self, transaction)  # type: ignore[abstract]


class GatedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, StreamdCluster)
        if _INSIDE.get():
            results = await super().execute(raise_on_error, allow_redirections)
        else:
            async with client.gated():
                results = await super().execute(raise_on_error, allow_redirections)
        # raise_on_error=False: a command's error is its result.
        return [_lost_result(r) for r in results]


def _closed_under_us(err: AttributeError) -> RedisConnectionError | None:
    """A connection closed by redis-py itself while a command was using it.

    When a node fails, redis-py disconnects the node's idle connections from
    a snapshot of its free list, and a command may have taken one of them
    meanwhile: it then fails on the closed socket with an AttributeError
    ('NoneType' object has no attribute ...) inside redis-py. For the caller
    that is a lost connection, like the node failure that caused it."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None and f"{os.sep}redis{os.sep}" in tb.tb_frame.f_code.co_filename and "NoneType" in str(err):
        return RedisConnectionError(f"connection closed during the command: {err}")
    return None


def _lost_result(result: Any) -> Any:
    if isinstance(result, AttributeError) and (lost := _closed_under_us(result)) is not None:
        return lost
    return result
