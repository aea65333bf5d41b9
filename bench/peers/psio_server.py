"""python-socketio AsyncServer on aiohttp, rooms across processes via AsyncRedisManager.

    python -m bench.peers.psio_server --redis-url redis://... [--port 0]

A client joins a room with the `join` event (acked); posts reach the room from
another process (`bench.publish`, AsyncRedisManager(write_only=True)) through
Redis pub/sub. uvloop, logging off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import socketio  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only
import uvloop
from aiohttp import web


def build(redis_url: str) -> web.Application:
    mgr = socketio.AsyncRedisManager(redis_url, logger=False)
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=mgr,
        logger=False,
        engineio_logger=False,
        transports=["websocket"],
    )

    @sio.event
    async def join(sid: str, room: str) -> bool:
        await sio.enter_room(sid, room)
        return True  # the ack: the client knows it is in the room

    app = web.Application()
    sio.attach(app)
    return app


async def serve(redis_url: str, host: str, port: int) -> None:
    runner = web.AppRunner(build(redis_url), access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    print(f"listening on http://{bound[0]}:{bound[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    logging.disable(logging.CRITICAL)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.redis_url, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
