"""The aiohttp application: HTTP API, WebSocket gateway, optionally a fan-out worker."""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from aiohttp import web

from streamd import http_api, http_feeds, http_lists, http_web, store
from streamd.auth import Auth
from streamd.autopipe import AutoPipeline
from streamd.errors import StreamdError, Unavailable, from_status
from streamd.fanout import FanoutWorker, LeaseBook
from streamd.gateway import make_recheck, websocket_handler
from streamd.http_base import AUTH, HUB, LISTS, REDIS, SCRIPTS, SETTINGS, json_response
from streamd.history import Histories
from streamd.hub import Hub
from streamd.ingest import INGEST, Ingest
from streamd.lists import Lists
from streamd.metrics import CONTENT_TYPE, Metrics
from streamd.ratelimit import KeyedLimiter
from streamd.settings import Settings
from streamd.store import TRANSIENT_ERRORS

log = logging.getLogger("streamd.app")

WORKER_STOP = web.AppKey("worker_stop", asyncio.Event)
METRICS = web.AppKey("metrics", Metrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_MESSAGES = {
    400: "bad request (a WebSocket endpoint needs an upgrade request)",
    404: "no such route",
    405: "method not allowed on this route",
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StreamdError as err:
        return json_response(err.body(), status=err.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _MESSAGES.get(exc.status, exc.reason or "request failed")
        if exc.status == 413:
            message = f"request body is larger than {request.app[SETTINGS].max_body_bytes} bytes"
        mapped = from_status(exc.status, message)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response(mapped.body(), status=exc.status, headers=headers)
    except TRANSIENT_ERRORS as exc:
        log.warning("redis unavailable during %s %s: %r", request.method, request.path, exc, exc_info=True)
        return json_response(Unavailable("storage is unavailable, try again").body(), status=503)


OPENAPI = resources.files("streamd").joinpath("openapi.json").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


async def scrape(request: web.Request) -> web.Response:
    """Prometheus metrics, readable by anyone: in production only the scraper should reach it."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    if not await store.answers(hub.redis, timeout=1.0):
        return json_response(Unavailable("redis does not answer").body(), status=503)
    if not hub.live.connected.is_set():
        return json_response(Unavailable("live channel to redis is down").body(), status=503)
    return json_response({"status": "ready"})


def metrics_app(metrics: Metrics) -> web.Application:
    """`/metrics` and `/healthz` alone, for a port of their own (`Settings.metrics_port`)."""
    app = web.Application(middlewares=[errors_middleware])
    app[METRICS] = metrics
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    return app


def make_app(settings: Settings, redis_url: str, *, with_worker: bool = False) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = metrics = Metrics()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        client = await store.open_client(redis_url, settings)
        scripts = store.Scripts.register(client)
        # The hot paths (tokens, memberships, accepting posts) share one
        # auto-pipelined connection when Redis is one server.
        fast = AutoPipeline.for_client(client) if isinstance(client, aioredis.Redis) else None
        app[REDIS] = client
        app[SCRIPTS] = scripts
        app[AUTH] = auth = Auth(
            client, scripts, settings.admin_token, settings.posts_per_minute, settings.embed_secret, fast=fast
        )
        app[LISTS] = lists = Lists(client, scripts, settings, fast=fast)
        app[INGEST] = Ingest(client, scripts, settings, auth, lists, metrics, fast)
        try:
            async with Hub(client, settings, metrics, Histories(client, scripts, fast)) as hub:
                hub.recheck = make_recheck(hub, lists)
                metrics.on_scrape(hub.sample)
                app[HUB] = hub
                yield
        finally:
            if fast is not None:
                await fast.aclose()
        await store.close(client)

    async def worker(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        app[WORKER_STOP] = stop
        # One worker per ingest shard, sharing the consumer group with any
        # other worker process.
        book = LeaseBook(app[HUB].redis, settings.ingest_shards, max(settings.claim_idle_ms, 100))
        tasks = [
            asyncio.create_task(
                FanoutWorker(app[HUB].redis, settings, shard=shard, metrics=metrics, book=book).run(stop),
                name=f"streamd-fanout-{shard}",
            )
            for shard in range(settings.ingest_shards)
        ]
        yield
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)

    async def on_shutdown(app: web.Application) -> None:
        await app[HUB].close_all()

    app.cleanup_ctx.append(resources)
    if with_worker:
        app.cleanup_ctx.append(worker)
    app.on_shutdown.append(on_shutdown)

    limiter = KeyedLimiter(settings.connections_per_second, settings.connections_burst)

    async def ws(request: web.Request) -> web.StreamResponse:
        return await websocket_handler(request, app[HUB], app[AUTH], app[LISTS], limiter, settings)

    app.router.add_get("/v1/ws", ws)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_routes(http_api.routes)
    app.router.add_routes(http_lists.routes)
    app.router.add_routes(http_feeds.routes)
    http_web.setup(app)  # the widget, its pages, CORS for embeds
    return app
