"""The load generator: child processes driven by JSON lines on stdin.

    python -m bench.loadgen poster       creates the authors, posts open-loop
    python -m bench.loadgen subscriber   holds WebSocket subscribers, records deliveries

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
import contextlib
import gc
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
_CLOSED = frozenset({aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED})


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

        conns = [await rawhttp.connect(self.base, answered, lost) for _ in range(cmd["senders"])]
        try:
            i = 0
            while i < count:
                t = now()
                while i < count and t0 + i * period <= t:
                    seq = start + i
                    scheduled = t0 + i * period
                    live = [c for c in conns if c.transport is not None]
                    if not live:
                        statuses["no connection"] += count - i
                        failed.extend(range(seq, start + count))
                        answers += count - i
                        i = count
                        break
                    conn = min(live, key=lambda c: len(c.inflight))
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


class Subscriber:
    """One WebSocket reading one feed; `counts[seq // feeds]` counts deliveries of post seq."""

    __slots__ = ("close_code", "counts", "feed", "index", "probe", "task", "ws")

    def __init__(self, index: int, feed: int, probe: bool) -> None:
        self.index = index
        self.feed = feed
        # A probe also records the post's `created_at`, to split its latency in two.
        self.probe = probe
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.counts = bytearray()
        self.close_code: int | None = None
        self.task: asyncio.Task[None] | None = None


class Subscribers:
    def __init__(self) -> None:
        self.session = new_session()
        self.feeds = 1
        self.subs: list[Subscriber] = []
        # One row per delivery, process-wide: which post, when scheduled, when received.
        self.seqs = array("q")
        self.sched = array("q")
        self.recv = array("q")
        # Probes only (one subscriber per feed): (seq, scheduled ns, created_at ms, received ns).
        self.probes: list[tuple[int, int, int, int]] = []
        self.unexpected: Counter[str] = Counter()
        self.loop_lag = LoopLag()

    async def close(self) -> None:
        await self.loop_lag.stop()
        closing = [s.ws.close() for s in self.subs if s.ws is not None and not s.ws.closed]
        with contextlib.suppress(TimeoutError):  # the parent stops the gateway next anyway
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), timeout=5)
        for sub in self.subs:
            if sub.task is not None:
                sub.task.cancel()
        await asyncio.gather(*(s.task for s in self.subs if s.task), return_exceptions=True)
        await self.session.close()

    async def open(self, cmd: dict[str, Any]) -> Reply:
        """Connect and subscribe every assigned subscriber, `concurrency` at a time."""
        self.feeds = cmd["feeds"]
        url = cmd["base"].replace("http://", "ws://", 1) + "/v1/ws"
        gate = asyncio.Semaphore(cmd["concurrency"])
        timeout: float = cmd["timeout_s"]

        async def one(sub: Subscriber) -> None:
            async with gate:
                ws = await self.session.ws_connect(url, autoping=True, max_msg_size=1 << 20)
                sub.ws = ws
                request = {"op": "subscribe", "ref": sub.index, "feed": feed_name(sub.feed)}
                await ws.send_str(orjson.dumps(request).decode())
                while True:
                    msg = await ws.receive(timeout=timeout)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RuntimeError(f"subscriber {sub.index}: {msg.type.name} before subscribed")
                    frame = orjson.loads(msg.data)
                    if frame.get("op") == "subscribed" and frame.get("ref") == sub.index:
                        break
                    if frame.get("op") == "error":
                        raise RuntimeError(f"subscriber {sub.index}: {frame}")
                sub.task = asyncio.create_task(self._read(sub, ws))

        subs = [Subscriber(i, f, i < self.feeds) for i, f in cmd["subs"]]
        self.subs += subs
        await asyncio.gather(*(one(s) for s in subs))
        # Every message allocates a few short-lived containers: without this,
        # collections that walk the thousands of long-lived socket objects
        # cost ~8% of this process's CPU.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        self.loop_lag.start()
        return {"ok": True, "opened": len(subs)}

    async def _read(self, sub: Subscriber, ws: aiohttp.ClientWebSocketResponse) -> None:
        # The hot loop of the load generator. Most of its CPU is aiohttp's
        # per-message machinery, so this stays at one await, one JSON parse and
        # a few appends (`receive()` directly: `async for` adds a frame per message).
        loads = orjson.loads
        now = time.monotonic_ns
        receive = ws.receive
        text_type = aiohttp.WSMsgType.TEXT
        seqs, sched, recv = self.seqs, self.sched, self.recv
        probes, probe = self.probes, sub.probe
        counts = sub.counts
        feeds = self.feeds
        want = feed_name(sub.feed)
        while True:
            msg = await receive()
            t = now()
            if msg.type is not text_type:
                if msg.type in _CLOSED:
                    break
                self.unexpected[f"msg:{msg.type.name}"] += 1
                continue
            frame = loads(msg.data)
            op = frame.get("op")
            if op != "post":
                if op != "heartbeat":  # sent on a quiet socket: normal between steps
                    self.unexpected[f"op:{op}"] += 1
                continue
            post = frame["post"]
            seq_s, _, sched_s = post["text"].partition(" ")
            seq = int(seq_s)
            if frame["feed"] != want or seq % feeds != sub.feed:
                self.unexpected["misrouted"] += 1
                continue
            slot = seq // feeds
            if slot >= len(counts):
                counts.extend(bytes(slot + 1024 - len(counts)))
            if counts[slot] < 255:
                counts[slot] += 1
            seqs.append(seq)
            sched.append(int(sched_s))
            recv.append(t)
            if probe:
                probes.append((seq, int(sched_s), post["created_at"], t))
        sub.close_code = ws.close_code

    def _received(self, lo: int, hi: int) -> int:
        return sum(1 for s in self.seqs if lo <= s < hi)

    async def collect(self, cmd: dict[str, Any]) -> Reply:
        """Wait for the step's deliveries to settle, then account for posts lo <= seq < hi.

        Returns latencies of the posts scheduled in the window [w0, w1), the
        deliveries received in that window, and lost and duplicated deliveries
        of every accepted post of the step. Rows of the step are dropped after.

        The probes' latencies are also split at the post's `created_at` (the
        server's clock, whole milliseconds): scheduled -> accepted is the HTTP
        ingest path, accepted -> received the fan-out and delivery path.
        """
        lo: int = cmd["lo"]
        hi: int = cmd["hi"]
        w0: int = cmd["w0_ns"]
        w1: int = cmd["w1_ns"]
        failed = set(cmd["failed"])
        feeds = self.feeds
        accepted_per_feed = Counter(s % feeds for s in range(lo, hi) if s not in failed)
        expected = sum(accepted_per_feed[s.feed] for s in self.subs if s.close_code is None)

        # Settle: until everything expected arrived, or nothing arrived for `quiet_s`, or `max_wait_s`.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cmd["max_wait_s"]
        last_n, last_change = len(self.seqs), loop.time()
        while loop.time() < deadline:
            n = len(self.seqs)
            if n != last_n:
                last_n, last_change = n, loop.time()
            elif loop.time() - last_change >= cmd["quiet_s"]:
                break
            # The full count is only worth taking once the row count could reach it.
            if n >= expected and self._received(lo, hi) >= expected:
                break
            await asyncio.sleep(0.05)

        latencies: list[int] = []
        seconds: list[int] = []  # of each latency: whole seconds from w0 to the post's schedule
        in_window = 0
        for seq, scheduled, received in zip(self.seqs, self.sched, self.recv, strict=True):
            if seq < lo:
                continue  # a straggler of an earlier step, already accounted for as lost
            if w0 <= scheduled < w1:
                latencies.append(received - scheduled)
                seconds.append((scheduled - w0) // 1_000_000_000)
            if w0 <= received < w1:
                in_window += 1
        to_accept: list[int] = []
        to_receive: list[int] = []
        wall = time.time_ns() - time.monotonic_ns()  # monotonic -> wall clock, as created_at is
        for seq, scheduled, created_ms, received in self.probes:
            if seq >= lo and w0 <= scheduled < w1:
                to_accept.append(created_ms * 1_000_000 - (scheduled + wall))
                to_receive.append(received + wall - created_ms * 1_000_000)
        # One step at a time: every row is this step's or a straggler's. In
        # place, because the reader tasks hold these containers.
        for rows in (self.seqs, self.sched, self.recv):
            del rows[:]
        self.probes.clear()
        unexpected, self.unexpected = dict(self.unexpected), Counter()

        lost = dup = 0
        for sub in self.subs:
            counts = sub.counts
            for seq in range(lo + (sub.feed - lo) % feeds, hi, feeds):
                if seq in failed:
                    continue
                slot = seq // feeds
                n = counts[slot] if slot < len(counts) else 0
                if n == 0:
                    lost += 1
                elif n > 1:
                    dup += n - 1
        closed = Counter(str(s.close_code) for s in self.subs if s.close_code is not None)
        return {
            "ok": True,
            "latencies_ns": latencies,
            "seconds": seconds,
            "loop_lag_ns": self.loop_lag.take(w0, w1),
            "to_accept_ns": to_accept,
            "accept_to_receive_ns": to_receive,
            "received_in_window": in_window,
            "lost": lost,
            "dup": dup,
            "closed": dict(closed),
            "unexpected": unexpected,
        }


# -- the command loop ------------------------------------------------------------------


async def serve(role: str) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    agent: Poster | Subscribers = Poster() if role == "poster" else Subscribers()
    handlers: dict[str, Handler] = (
        {"setup": agent.setup, "post": agent.post}
        if isinstance(agent, Poster)
        else {"open": agent.open, "collect": agent.collect}
    )
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
    if len(argv) != 1 or argv[0] not in ("poster", "subscriber"):
        print("usage: python -m bench.loadgen poster|subscriber  (driven by the fanout scenario)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
