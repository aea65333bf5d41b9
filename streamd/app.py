"""The aiohttp application: HTTP API, WebSocket gateway, optionally a fan-out worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, TimeoutError as RedisTimeoutError

from streamd import http_api, store
from streamd.auth import Auth
from streamd.errors import StreamdError, Unavailable, from_status
from streamd.fanout import FanoutWorker
from streamd.gateway import websocket_handler
from streamd.http_api import AUTH, SCRIPTS, SETTINGS, json_response
from streamd.hub import Hub
from streamd.settings import Settings

log = logging.getLogger("streamd.app")

REDIS = web.AppKey("redis", object)
HUB = web.AppKey("hub", Hub)
WORKER_STOP = web.AppKey("worker_stop", asyncio.Event)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StreamdError as err:
        return json_response(err.body(), status=err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = from_status(exc.status, exc.reason or "request failed")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response(err.body(), status=exc.status, headers=headers)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        log.warning("redis unavailable during %s %s: %r", request.method, request.path, exc, exc_info=True)
        return json_response(Unavailable("storage is unavailable, try again").body(), status=503)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    try:
        await asyncio.wait_for(hub.redis.ping(), timeout=1.0)
    except (RedisError, OSError, TimeoutError):
        return json_response(Unavailable("redis does not answer").body(), status=503)
    if not hub.live.connected.is_set():
        return json_response(Unavailable("live channel to redis is down").body(), status=503)
    return json_response({"status": "ready"})


def make_app(settings: Settings, redis_url: str, *, with_worker: bool = False) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings

    async def resources(app: web.Application) -> AsyncIterator[None]:
        client = store.connect(redis_url, settings)
        app[REDIS] = client
        app[AUTH] = Auth(client, settings.admin_token)
        app[SCRIPTS] = store.Scripts.register(client)
        async with Hub(client, settings) as hub:
            app[HUB] = hub
            yield
        await client.aclose()

    async def worker(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        app[WORKER_STOP] = stop
        fanout = FanoutWorker(app[HUB].redis, settings)
        task = asyncio.create_task(fanout.run(stop), name="streamd-fanout")
        yield
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)

    async def on_shutdown(app: web.Application) -> None:
        await app[HUB].close_all()

    app.cleanup_ctx.append(resources)
    if with_worker:
        app.cleanup_ctx.append(worker)
    app.on_shutdown.append(on_shutdown)

    async def ws(request: web.Request) -> web.StreamResponse:
        return await websocket_handler(request, app[HUB], app[AUTH], settings)

    app.router.add_get("/v1/ws", ws)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_routes(http_api.routes)
    return app
