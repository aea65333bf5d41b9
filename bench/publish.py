"""Publishers of the Python peers: post to a room from another process, through Redis only.

    python -m bench.publish psio --redis-url URL       python-socketio AsyncRedisManager(write_only=True)
    python -m bench.publish channels --redis-url URL   channels_redis pub/sub layer, group_send
    python -m bench.publish streamd --redis-url URL    streamd.publisher.Publisher (the project's venv)

Run from bench/.venv-peers (streamd: the project's venv). Driven like `bench.loadgen`'s poster, JSON lines on
stdin: `{"cmd": "post", "t0_ns", "period_ns", "seq_start", "count", "feeds",
"senders"}` posts open-loop, post i scheduled at t0 + i * period, to room
`user:h<seq % feeds>`. The item is shaped like a streamd frame so that every
engine's subscribers parse the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvloop

from bench.stats import summary_ms

Emit = Callable[[str, dict[str, Any]], Awaitable[None]]


def item(seq: int, feed: int, scheduled: int) -> dict[str, Any]:
    created = time.time_ns() // 1_000_000
    return {
        "op": "post",
        "feed": f"user:h{feed}",
        "cursor": f"0.{created}-{seq}",
        "post": {
            "id": f"{created}-{seq}",
            "author": f"h{feed}",
            "text": f"{seq} {scheduled}",
            "events": [],
            "media": [],
            "created_at": created,
        },
    }


async def psio_emitter(redis_url: str, stack: contextlib.AsyncExitStack) -> Emit:
    import socketio  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only

    mgr = socketio.AsyncRedisManager(redis_url, write_only=True, logger=False)

    async def emit(room: str, payload: dict[str, Any]) -> None:
        await mgr.emit("post", payload, room=room, namespace="/")

    return emit


async def channels_emitter(redis_url: str, stack: contextlib.AsyncExitStack) -> Emit:
    os.environ["BENCH_REDIS_URL"] = redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.peers.channels_app.settings")
    import django  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only

    django.setup()
    from channels.layers import get_channel_layer  # type: ignore[import-not-found, import-untyped, unused-ignore]  # peers venv only

    from bench.peers.channels_app.consumers import group_name

    layer = get_channel_layer()
    assert layer is not None

    async def emit(room: str, payload: dict[str, Any]) -> None:
        # Encode once here; the consumer forwards the text as it is.
        await layer.group_send(group_name(room), {"type": "post.message", "frame": orjson.dumps(payload).decode()})

    return emit


async def streamd_emitter(redis_url: str, stack: contextlib.AsyncExitStack) -> Emit:
    """streamd's own backend publisher (`streamd.publisher`): the same
    validation, lists and `ingest_post.lua` as `POST /v1/posts`, without HTTP."""
    from streamd.publisher import Publisher
    from streamd.settings import Settings

    publisher = await stack.enter_async_context(Publisher.open(redis_url, Settings.from_env()))

    async def emit(room: str, payload: dict[str, Any]) -> None:
        await publisher.post(payload["post"]["author"], {"text": payload["post"]["text"]})

    return emit


async def streamd_setup(cmd: dict[str, Any]) -> None:
    """The authors h0..hF-1, created over HTTP with the admin token as the
    HTTP poster creates them (not measured)."""
    from bench.loadgen import Poster

    poster = Poster()
    try:
        reply = await poster.setup(cmd)
    finally:
        await poster.close()
    if not reply["ok"]:
        raise RuntimeError(reply["error"])


EMITTERS = {"psio": psio_emitter, "channels": channels_emitter, "streamd": streamd_emitter}
SETUPS = {"streamd": streamd_setup}


async def post(emit: Emit, cmd: dict[str, Any]) -> dict[str, Any]:
    t0: int = cmd["t0_ns"]
    period: int = cmd["period_ns"]
    start: int = cmd["seq_start"]
    count: int = cmd["count"]
    feeds: int = cmd["feeds"]
    lag: list[int] = []
    rtt: list[int] = []
    failed: list[int] = []
    statuses: Counter[str] = Counter()
    next_i = 0
    now = time.monotonic_ns

    async def sender() -> None:
        nonlocal next_i
        while next_i < count:
            i = next_i
            next_i += 1
            seq = start + i
            scheduled = t0 + i * period
            delay = scheduled - now()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            sent = now()
            lag.append(sent - scheduled)
            feed = seq % feeds
            try:
                await emit(f"user:h{feed}", item(seq, feed, scheduled))
            except Exception as err:  # counted, not fatal: the run reports it
                statuses[type(err).__name__] += 1
                failed.append(seq)
                continue
            rtt.append(now() - sent)
            statuses["published"] += 1

    await asyncio.gather(*(sender() for _ in range(cmd.get("senders", 8))))
    return {
        "ok": True,
        "accepted": count - len(failed),
        "failed": failed,
        "statuses": dict(statuses),
        "send_lag_ms": summary_ms(lag),
        "http_ms": summary_ms(rtt),
    }


async def serve(kind: str, redis_url: str) -> int:
    async with contextlib.AsyncExitStack() as stack:
        return await _serve(kind, await EMITTERS[kind](redis_url, stack))


async def _serve(kind: str, emit: Emit) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    while line := await reader.readline():
        cmd = orjson.loads(line)
        try:
            if cmd["cmd"] == "setup":
                if kind in SETUPS:
                    await SETUPS[kind](cmd)
                # As the HTTP poster and the load generator do: what exists now lives
                # for the whole run, and a full collection of it would stall the posts.
                gc.collect()
                gc.freeze()
                reply: dict[str, Any] = {"ok": True}
            elif cmd["cmd"] == "post":
                reply = await post(emit, cmd)
            else:
                reply = {"ok": False, "error": f"unknown command {cmd['cmd']}"}
        except Exception as err:
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        out.write(orjson.dumps(reply) + b"\n")
        out.flush()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in EMITTERS or argv[1] != "--redis-url":
        print(f"usage: python -m bench.publish {'|'.join(EMITTERS)} --redis-url URL", file=sys.stderr)
        return 2
    logging.disable(logging.INFO)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(argv[0], argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
