"""The streamd poster of the load generator: a child process driven by JSON lines on stdin.

    python -m bench.loadgen poster       creates the authors, posts open-loop

(The subscribers are bench/subload.py, for every engine.)

Each command is one JSON object per line on stdin, each reply one JSON object
per line on stdout (`{"ok": true, ...}` or `{"ok": false, "error": ...}`).
EOF on stdin ends the process: the parent is done or gone.

Posts carry `"<seq> <scheduled send time>"` as their text. `seq` is unique over
the whole run and post `seq` is by author `seq % feeds`, so every subscriber
knows which posts it must see. Times are CLOCK_MONOTONIC nanoseconds, one
clock for every process on the machine, so a subscriber computes the latency
from the time the post was *scheduled* to be sent (not when it was sent: a
sender held up by a slow server must not hide that delay, i.e. no coordinated
omission).
"""

from __future__ import annotations

import asyncio
import gc
import math
import logging
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import uvloop

from bench import rawhttp
from bench.stats import summary_ms

log = logging.getLogger("bench.loadgen")

Reply = dict[str, Any]
Handler = Callable[[dict[str, Any]], Awaitable[Reply]]

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


def feed_name(index: int) -> str:
    return f"user:{handle(index)}"


def handle(index: int) -> str:
    return f"h{index}"


def new_session() -> aiohttp.ClientSession:
    # limit=0: the default connector stops at 100 connections.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=HTTP_TIMEOUT)


# -- posting -----------------------------------------------------------------------


class Poster:
    def __init__(self) -> None:
        self.session = new_session()
        self.base = ""
        self.tokens: list[str] = []

    async def close(self) -> None:
        await self.session.close()

    async def setup(self, cmd: dict[str, Any]) -> Reply:
        """Create one author per feed (users h0..hF-1); keep their tokens."""
        self.base = cmd["base"]
        headers = {"Authorization": f"Bearer {cmd['admin_token']}"}
        self.tokens = []
        for i in range(cmd["feeds"]):
            body = orjson.dumps({"handle": handle(i)})
            async with self.session.post(f"{self.base}/v1/users", data=body, headers=headers) as resp:
                reply = await resp.read()
                if resp.status != 201:
                    return {"ok": False, "error": f"POST /v1/users {handle(i)}: {resp.status} {reply[:300]!r}"}
                self.tokens.append(orjson.loads(reply)["token"])
        gc.collect()
        gc.freeze()  # what exists now lives for the whole run: keep it out of every collection
        return {"ok": True, "users": len(self.tokens)}

    async def post(self, cmd: dict[str, Any]) -> Reply:
        """Post `count` posts, post i scheduled at t0 + i * period, over `senders` keep-alive connections.

        Open loop: the schedule never waits for replies. Posts whose time has
        come go out at once, pipelined on the connection with the fewest in
        flight, written raw (bench/rawhttp.py: aiohttp's client would cost as
        much CPU per post as the server, on the core the servers share).
        Lateness shows in the latencies (measured from the schedule) and in
        `send_lag`.
        """
        t0: int = cmd["t0_ns"]
        period: int = cmd["period_ns"]
        start: int = cmd["seq_start"]
        count: int = cmd["count"]
        host = self.base.removeprefix("http://").rstrip("/")
        auth = [{"Authorization": f"Bearer {t}", "Content-Type": "application/json"} for t in self.tokens]
        feeds = len(auth)
        lag: list[int] = []
        http: list[int] = []
        statuses: Counter[str] = Counter()
        failed: list[int] = []
        now = time.monotonic_ns
        done = asyncio.Event()
        answers = 0

        def answered(status: int, body: bytes, token: tuple[int, int]) -> None:
            nonlocal answers
            seq, sent = token
            http.append(now() - sent)
            statuses[str(status)] += 1
            if status != 201:
                failed.append(seq)
            answers += 1
            if answers == count:
                done.set()

        def lost(conn: rawhttp.Connection, tokens: list[tuple[int, int]]) -> None:
            nonlocal answers
            statuses["connection lost"] += len(tokens)
            failed.extend(seq for seq, _ in tokens)
            answers += len(tokens)
            if answers == count:
                done.set()

        def load(conn: rawhttp.Connection) -> float:
            return len(conn.inflight) if conn.transport is not None else math.inf

        conns = [await rawhttp.connect(self.base, answered, lost) for _ in range(cmd["senders"])]
        try:
            i = 0
            while i < count:
                t = now()
                while i < count and t0 + i * period <= t:
                    seq = start + i
                    scheduled = t0 + i * period
                    conn = min(conns, key=load)
                    if conn.transport is None:  # every connection is gone
                        statuses["no connection"] += count - i
                        failed.extend(range(seq, start + count))
                        answers += count - i
                        i = count
                        break
                    body = orjson.dumps({"text": f"{seq} {scheduled}"})
                    sent = now()
                    lag.append(sent - scheduled)
                    conn.send(rawhttp.request("POST", host, "/v1/posts", body, auth[seq % feeds]), (seq, sent))
                    i += 1
                if i < count:
                    await asyncio.sleep(max(0, t0 + i * period - now()) / 1e9)
            if answers < count:
                await asyncio.wait_for(done.wait(), HTTP_TIMEOUT.total)
        finally:
            for c in conns:
                c.close()
        return {
            "ok": True,
            "accepted": count - len(failed),
            "failed": failed,
            "statuses": dict(statuses),
            "send_lag_ms": summary_ms(lag),
            "http_ms": summary_ms(http),
        }


# -- subscribing ---------------------------------------------------------------------


class LoopLag:
    """How late the event loop runs a short timer, sampled all the time.

    A load generator that cannot keep up shows here first: when its loop is
    late by X ms, every latency it measures meanwhile is inflated by up to X.
    """

    INTERVAL_NS = 5_000_000

    def __init__(self) -> None:
        self.at = array("q")
        self.lag = array("q")
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        now = time.monotonic_ns
        while True:
            t = now()
            await asyncio.sleep(self.INTERVAL_NS / 1e9)
            self.at.append(t)
            self.lag.append(now() - t - self.INTERVAL_NS)

    def take(self, w0: int, w1: int) -> list[int]:
        """The samples taken in [w0, w1); forgets every sample."""
        out = [lag for at, lag in zip(self.at, self.lag, strict=True) if w0 <= at < w1]
        del self.at[:]
        del self.lag[:]
        return out

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


# -- the command loop ------------------------------------------------------------------


async def serve(role: str) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    agent = Poster()
    handlers: dict[str, Handler] = {"setup": agent.setup, "post": agent.post}
    try:
        while line := await reader.readline():
            cmd = orjson.loads(line)
            try:
                reply = await handlers[cmd["cmd"]](cmd)
            except Exception as err:  # the parent decides what an error means; report it whole
                log.exception("command %s failed", cmd.get("cmd"))
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            # A blocking write is fine: the parent reads replies as soon as it sent the command.
            out.write(orjson.dumps(reply) + b"\n")
            out.flush()
    finally:
        await agent.close()
    return 0


def main(argv: list[str]) -> int:
    if argv != ["poster"]:
        print("usage: python -m bench.loadgen poster  (driven by bench.compare)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
