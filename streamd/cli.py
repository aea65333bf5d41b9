"""`streamd run | gateway | fanout | tail | post`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from streamd import __version__, logs, store, tail
from streamd.app import METRICS, make_app, metrics_app
from streamd.embedded import EmbeddedError, EmbeddedRedis
from streamd.fanout import FanoutWorker, LeaseBook
from streamd.gcpolicy import frozen_heap
from streamd.metrics import Metrics
from streamd.settings import Settings
from streamd.supervisor import READY, SharedPort, Supervisor


def _add_common(p: argparse.ArgumentParser, *, http: bool, redis_required: bool) -> None:
    if http:
        p.add_argument("--host", help="address to listen on (STREAMD_HOST, default 127.0.0.1)")
        p.add_argument("--port", type=int, help="port to listen on, 0 for any (STREAMD_PORT, default 8080)")
    help_url = "Redis URL (STREAMD_REDIS_URL); a Redis Cluster node is detected, and several nodes may be given, comma-separated"
    if not redis_required:
        help_url += "; without it a private server is started in --data-dir"
    p.add_argument("--redis-url", help=help_url)
    p.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")
    what = "gateways sharing the port" if http else "fan-out workers"
    p.add_argument(
        "--workers", type=int, help=f"processes ({what}), restarted when they crash (STREAMD_WORKERS, default 1)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        help="also serve /metrics on this port, + i for worker i of --workers (STREAMD_METRICS_PORT, default 0: off)",
    )
    if http:
        # Given by the supervisor to its workers (supervisor.py).
        p.add_argument("--reuse-port", action="store_true", default=None, help=argparse.SUPPRESS)
        p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="streamd", description="Real-time feeds over WebSockets from Redis Streams.")
    top.add_argument("--version", action="version", version=f"streamd {__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="all in one: gateway + fan-out worker (+ a private Redis)")
    _add_common(run, http=True, redis_required=False)
    run.add_argument("--data-dir", help="where the private Redis keeps its data (STREAMD_DATA_DIR)")
    gateway = sub.add_parser("gateway", help="HTTP API and WebSocket gateway")
    _add_common(gateway, http=True, redis_required=True)
    fanout = sub.add_parser("fanout", help="fan-out worker")
    _add_common(fanout, http=False, redis_required=True)
    watch = sub.add_parser("tail", help="print feeds live in the terminal")
    watch.add_argument("feeds", nargs="+", metavar="FEED", help="user:<handle>, list:<id> or event:<slug>")
    watch.add_argument("--backlog", type=int, default=0, help="first show the last N items of each feed (0..100)")
    _add_client(watch)
    publish = sub.add_parser("post", help="publish a post and print its id")
    publish.add_argument("text")
    publish.add_argument(
        "--event", dest="events", action="append", default=[], metavar="SLUG", help="tag with an event (repeatable)"
    )
    _add_client(publish)
    return top


def _add_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"the gateway's base URL (STREAMD_URL, default {tail.DEFAULT_URL})")
    p.add_argument("--token", help="a user, admin or embed token (STREAMD_TOKEN)")


@dataclass(frozen=True, slots=True)
class Listen:
    """How a gateway gets its listening socket: bound by itself (SO_REUSEPORT when
    it is one of several workers), or inherited from the supervisor."""

    reuse_port: bool = False
    fd: int | None = None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.command in ("tail", "post"):
        # Clients of a gateway: none of the server's Settings apply.
        return _run_client(args)
    listen = Listen(bool(vars(args).pop("reuse_port", None)), vars(args).pop("listen_fd", None))
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    settings = Settings.from_env(**flags)
    logs.setup(settings.log_json)
    commands: dict[str, Callable[[Settings, Listen], Coroutine[Any, Any, int]]] = {
        "run": run_all,
        "gateway": run_gateway,
        "fanout": run_fanout,
    }
    if args.command != "run" and not settings.redis_url:
        print(f"streamd {args.command}: --redis-url (or STREAMD_REDIS_URL) is required", file=sys.stderr)
        return 2
    if settings.workers < 1:
        print(f"streamd {args.command}: --workers must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= settings.metrics_port <= 65535:
        print(f"streamd {args.command}: --metrics-port must be 0 (off) to 65535", file=sys.stderr)
        return 2
    if settings.workers > 1:
        return _run_loop(supervise(args.command, settings, argv))
    try:
        return _run_loop(commands[args.command](settings, listen))
    except ListenError as err:
        print(f"streamd {args.command}: {err}", file=sys.stderr)
        return 1


def _run_client(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("STREAMD_URL") or tail.DEFAULT_URL
    token = args.token or os.environ.get("STREAMD_TOKEN") or None
    if args.command == "tail":
        coro = tail.tail(url, token, args.feeds, args.backlog)
    else:
        coro = tail.post(url, token, args.text, args.events)
    try:
        return _run_loop(coro)
    except KeyboardInterrupt:
        # Ctrl-C before `tail` installed its own handler: still a clean stop.
        return 0 if args.command == "tail" else 130


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    factory: Callable[[], asyncio.AbstractEventLoop]
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class ListenError(RuntimeError):
    """A port this process was asked to serve on and could not bind: a start-up error, not a crash."""


def _reason(err: Exception) -> str:
    """Why a bind failed, in the system's words ("Address already in use")."""
    return os.strerror(err.errno) if isinstance(err, OSError) and err.errno else str(err)


@contextlib.asynccontextmanager
async def metrics_server(settings: Settings, metrics: Metrics) -> AsyncIterator[str | None]:
    """`metrics_app` on `metrics_port` + this process's worker index; its URL, None when off.

    Bound before the process says it is ready, so that under the supervisor a
    port in use is a failed start (given up after a few), not a crash loop.
    """
    if not settings.metrics_port:
        yield None
        return
    # Set by the supervisor for each of its workers (supervisor.py); absent for a lone process.
    port = settings.metrics_port + int(os.environ.get("STREAMD_WORKER_INDEX") or 0)
    runner = web.AppRunner(metrics_app(metrics), handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.host, port).start()
        except (OSError, OverflowError) as err:
            where = f"{settings.host}:{port} (--metrics-port, STREAMD_METRICS_PORT)"
            raise ListenError(f"cannot serve /metrics on {where}: {_reason(err)}") from None
        yield f"http://{settings.host}:{port}/metrics"
    finally:
        await runner.cleanup()


def admin_token_for(settings: Settings) -> str:
    """STREAMD_ADMIN_TOKEN, else the one kept in the data dir (made on first start)."""
    if settings.admin_token:
        return settings.admin_token
    path = Path(settings.data_dir) / "admin_token"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "sda_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


async def _serve(settings: Settings, redis_url: str, *, with_worker: bool, lines: list[str], listen: Listen) -> int:
    stop = _stop_on_signals()
    app = make_app(settings, redis_url, with_worker=with_worker)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        # Inside the app's runner: the scrape samples the hub, which the runner's cleanup closes.
        async with metrics_server(settings, app[METRICS]) as metrics_url:
            site: web.TCPSite | web.SockSite
            if listen.fd is not None:
                site = web.SockSite(runner, socket.socket(fileno=listen.fd))
            else:
                site = web.TCPSite(
                    runner, settings.host, settings.port, backlog=1024, reuse_port=listen.reuse_port or None
                )
            try:
                await site.start()
            except OSError as err:
                raise ListenError(f"cannot listen on {settings.host}:{settings.port}: {_reason(err)}") from None
            host, port = _bound(site, settings)
            url = f"http://{host}:{port}"
            print(f"streamd {__version__} listening on {url}", flush=True)
            if not (listen.reuse_port or listen.fd is not None):  # else a worker: the supervisor says the rest
                print(f"  WebSocket    ws://{host}:{port}/v1/ws", flush=True)
                for line in lines:
                    print(f"  {line}", flush=True)
            if metrics_url:  # a worker's own, unlike the rest: the supervisor passes it on marked with its index
                print(f"  Metrics      {metrics_url}", flush=True)
            async with frozen_heap(settings.gc_full_collect_seconds):
                await stop.wait()
            print("streamd: stopping (closing sockets with 1001, finishing the fan-out batch)", flush=True)
    finally:
        await runner.cleanup()
    return 0


def _bound(site: web.TCPSite | web.SockSite, settings: Settings) -> tuple[str, int]:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else settings.port
    return settings.host, port


async def run_all(settings: Settings, listen: Listen = Listen()) -> int:
    embedded: EmbeddedRedis | None = None
    lines: list[str] = []
    redis_url = settings.redis_url
    try:
        admin = admin_token_for(settings)
        if redis_url is None:
            embedded = EmbeddedRedis(Path(settings.data_dir) / "redis", appendonly=True)
            redis_url = await asyncio.to_thread(embedded.start)
            lines.append(f"Redis        {redis_url} ({Path(embedded.binary or '').name}, data in {embedded.data_dir})")
        else:
            lines.append(f"Redis        {redis_url}")
        lines.append(f"Admin token  {admin}")
        return await _serve(settings.replace(admin_token=admin), redis_url, with_worker=True, lines=lines, listen=listen)
    except EmbeddedError as err:
        print(f"streamd: {err}", file=sys.stderr)
        return 1
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def run_gateway(settings: Settings, listen: Listen = Listen()) -> int:
    assert settings.redis_url
    admin = "configured" if settings.admin_token else "not set (admin routes answer 401)"
    return await _serve(settings, settings.redis_url, with_worker=False, lines=[f"Admin token  {admin}"], listen=listen)


async def run_fanout(settings: Settings, listen: Listen = Listen()) -> int:
    assert settings.redis_url
    stop = _stop_on_signals()
    client = await store.open_client(settings.redis_url, settings)
    metrics = Metrics()  # one for the process: a scrape sees every shard's worker
    try:
        book = LeaseBook(client, settings.ingest_shards, max(settings.claim_idle_ms, 100))
        workers = [
            FanoutWorker(client, settings, shard=s, metrics=metrics, book=book) for s in range(settings.ingest_shards)
        ]
        async with metrics_server(settings, metrics) as metrics_url:
            print(f"streamd {__version__} fan-out worker {workers[0].consumer} on {settings.redis_url}", flush=True)
            if metrics_url:
                print(f"  Metrics      {metrics_url}", flush=True)
            async with frozen_heap(settings.gc_full_collect_seconds):
                await asyncio.gather(*(w.run(stop) for w in workers))
    finally:
        await store.close(client)
    return 0


async def supervise(command: str, settings: Settings, argv: list[str]) -> int:
    """`--workers N`: N processes of `command`, kept running (supervisor.py).

    Each worker is this command with `--workers 1`. Gateways share the port;
    `run` starts the private Redis (if any) here, once, and gives every
    worker its URL and the admin token. Every fan-out process reads every
    ingest shard: the consumer group spreads the entries over them.
    """
    stop = _stop_on_signals()
    base = [sys.executable, "-m", "streamd", *argv, "--workers", "1"]
    env = dict(os.environ)
    embedded: EmbeddedRedis | None = None
    shared: SharedPort | None = None
    lines: list[str] = []
    try:
        if command == "run":
            admin = admin_token_for(settings)
            env["STREAMD_ADMIN_TOKEN"] = admin
            redis_url = settings.redis_url
            if redis_url is None:
                embedded = EmbeddedRedis(Path(settings.data_dir) / "redis", appendonly=True)
                redis_url = await asyncio.to_thread(embedded.start)
                lines.append(f"Redis        {redis_url} ({Path(embedded.binary or '').name}, data in {embedded.data_dir})")
                base += ["--redis-url", redis_url]
            else:
                lines.append(f"Redis        {redis_url}")
            lines.append(f"Admin token  {admin}")
        if command in ("run", "gateway"):
            shared = SharedPort.bind(settings.host, settings.port)
            base += shared.worker_args()
        supervisor = Supervisor(
            base,
            settings.workers,
            env=env,
            pass_fds=shared.pass_fds() if shared else (),
            ready_line=READY if shared else b"fan-out worker",
        )
        running = asyncio.create_task(supervisor.run(stop))
        if await supervisor.wait_ready():
            how = "" if shared is None else (", SO_REUSEPORT" if shared.reuse_port else ", one shared socket")
            pids = " ".join(map(str, supervisor.pids()))
            if shared is not None:
                url = f"http://{shared.host}:{shared.port}"
                print(f"streamd {__version__} listening on {url}", flush=True)
                print(f"  WebSocket    ws://{shared.host}:{shared.port}/v1/ws", flush=True)
            else:
                print(f"streamd {__version__} fan-out workers on {settings.redis_url}", flush=True)
            print(f"  Workers      {settings.workers} {command} processes{how} (pids {pids})", flush=True)
            for line in lines:
                print(f"  {line}", flush=True)
        supervisor.announced.set()  # ready or not: what the workers say goes out
        status = await running
        if status:
            print(f"streamd: the {command} workers could not be started; see their log lines above", file=sys.stderr)
        return status
    except EmbeddedError as err:
        print(f"streamd: {err}", file=sys.stderr)
        return 1
    finally:
        if shared is not None:
            shared.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
