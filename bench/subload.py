"""Subscriber load generator for `python -m bench compare`: one engine's wire protocol, many sockets.

    python -m bench.subload      (driven by bench.compare over JSON lines, like bench.loadgen)

Speaks each engine's own protocol over the raw client of `bench.wsclient`
(a few microseconds of CPU per frame, against ~20 us with aiohttp):

- `streamd`: `/v1/ws`, `{"op": "subscribe", "feed", "ref"}` -> `subscribed`;
  a reconnect sends the last cursor it saw.
- `socketio` (python-socketio and Node socket.io): Engine.IO v4 / Socket.IO v5
  text protocol over the WebSocket transport only: `0{...}` open, `40` connect,
  `42N["join", room]` with ack N -> `43N[...]`, events `42["post", {...}]`,
  ping `2` answered with pong `3`.
- `channels`: plain JSON, `{"op": "join", "room"}` -> `{"op": "joined"}`.

Every engine delivers the same item, shaped like a streamd frame:
`{"op": "post", "feed", "cursor", "post": {"text": "<seq> <scheduled ns>", ...}}`.
The accounting (latency from the scheduled send time, loss and duplicates
per subscriber and post) is that of `bench.loadgen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import uvloop

from bench.loadgen import LoopLag, feed_name
from bench.stats import summary_ms
from bench.wsclient import WSClient, connect

log = logging.getLogger("bench.subload")
Reply = dict[str, Any]

PARSE_CHUNK = 20_000  # frames read between two turns of the loop after a step
MAX_RAW = 4_000_000  # frames kept unread at most (~1 GB)

PATHS = {"streamd": "/v1/ws", "socketio": "/socket.io/?EIO=4&transport=websocket", "channels": "/ws/"}


class Sub:
    """One subscriber: its feed, its deliveries by post (`counts[seq // feeds]`), its live socket."""

    __slots__ = (
        "client", "counts", "cursor", "feed", "feed_field", "index", "last", "live", "live_at", "retries", "state",
    )

    def __init__(self, index: int, feed: int) -> None:
        self.index = index
        self.feed = feed
        self.feed_field = b'"feed":"' + feed_name(feed).encode() + b'"'  # as every engine's item has it
        self.counts = bytearray()
        self.cursor: str | None = None  # from `subscribed`, until a post is seen
        self.last: bytes | None = None  # the last post frame: its cursor is where a reconnect resumes
        self.client: WSClient | None = None
        self.live: asyncio.Future[None] | None = None
        self.live_at = 0
        self.retries = 0
        self.state = 0  # socketio: 0 before `0{}`, 1 connecting, 2 joining, 3 live


class Load:
    def __init__(self) -> None:
        self.engine = "streamd"
        self.host = "127.0.0.1"
        self.port = 0
        self.feeds = 1
        self.subs: list[Sub] = []
        self.seqs = array("q")
        self.sched = array("q")
        self.recv = array("q")
        # Post frames as received, read after the step (`_parse`): while posts
        # flow, a frame costs an append or three, not a parse.
        self.raw: list[bytes] = []
        self.raw_t = array("q")
        self.raw_sub: list[Sub] = []
        self.raw_kind = 0  # 0: a JSON item; 2: a Socket.IO `42[...]` event
        self._bound: asyncio.Task[None] | None = None
        self.unexpected: Counter[str] = Counter()
        self.closed: Counter[str] = Counter()
        self.loop_lag = LoopLag()

    async def close(self) -> None:
        await self.loop_lag.stop()
        if self._bound is not None:
            self._bound.cancel()
            await asyncio.gather(self._bound, return_exceptions=True)
        for s in self.subs:
            if s.client is not None:
                s.client.abort()

    # -- delivery: the hot path -------------------------------------------------------

    def _deliver(self, sub: Sub, frame: dict[str, Any], t: int) -> None:
        post = frame["post"]
        seq_s, _, sched_s = post["text"].partition(" ")
        seq = int(seq_s)
        feeds = self.feeds
        if frame["feed"] != feed_name(sub.feed) or seq % feeds != sub.feed:
            self.unexpected["misrouted"] += 1
            return
        self._count(sub, seq, int(sched_s), t)

    def _count(self, sub: Sub, seq: int, scheduled: int, t: int) -> None:
        """One delivery of post `seq` to `sub`, received at `t`."""
        slot = seq // self.feeds
        counts = sub.counts
        if slot >= len(counts):
            counts.extend(bytes(slot + 1024 - len(counts)))
        if counts[slot] < 255:
            counts[slot] += 1
        self.seqs.append(seq)
        self.sched.append(scheduled)
        self.recv.append(t)

    def _deliver_bytes(self, sub: Sub, data: bytes, t: int) -> bool:
        """`_deliver` for an item found in the frame's bytes, without decoding
        it (a step leaves hundreds of thousands to read); False if
        the bytes are not shaped as expected, for the caller to decode."""
        start = data.find(b'"text":"')
        if start < 0:
            return False
        start += 8
        space = data.find(b" ", start)
        end = data.find(b'"', start)
        if not start < space < end:
            return False
        if data.find(sub.feed_field) < 0:
            return False  # another feed, or another spelling of the JSON: decoded and checked there
        seq = int(data[start:space])
        feeds = self.feeds
        if seq % feeds != sub.feed:
            self.unexpected["misrouted"] += 1
            return True
        self._count(sub, seq, int(data[space + 1 : end]), t)
        return True

    def _parse_some(self, limit: int) -> int:
        """Account for up to `limit` of the frames kept raw, oldest first; how many."""
        raw, raw_t, raw_sub = self.raw, self.raw_t, self.raw_sub
        k = min(limit, len(raw))
        deliver, deliver_bytes, loads = self._deliver, self._deliver_bytes, orjson.loads
        skip = self.raw_kind
        for i in range(k):
            sub, data, t = raw_sub[i], raw[i], raw_t[i]
            if not deliver_bytes(sub, data, t):
                event = loads(data[skip:])
                deliver(sub, event[1] if skip else event, t)
        del raw[:k], raw_t[:k], raw_sub[:k]
        return k

    async def _parse(self) -> None:
        """Account for every frame kept raw, yielding to the loop now and then
        (Socket.IO pings must still be answered)."""
        while self._parse_some(PARSE_CHUNK):
            await asyncio.sleep(0)

    async def _keep_bounded(self) -> None:
        """Frames kept raw stay under MAX_RAW: past it they are read at once
        (only a step far beyond any rate here gets there)."""
        while True:
            await asyncio.sleep(1)
            if len(self.raw) > MAX_RAW:
                await self._parse()

    def cursor(self, sub: Sub) -> str | None:
        """Where `sub` resumes: the cursor of the last post it read, else of its `subscribed`."""
        last = sub.last
        if last is None:
            return sub.cursor
        at = last.find(b'"cursor":"')
        if at < 0:
            return orjson.loads(last).get("cursor")  # type: ignore[no-any-return]
        at += 10
        return last[at : last.find(b'"', at)].decode()

    def _on_text(self, sub: Sub) -> Callable[[bytes], None]:
        now = time.monotonic_ns
        loads = orjson.loads
        unexpected = self.unexpected
        keep, keep_t, keep_sub = self.raw.append, self.raw_t.append, self.raw_sub.append

        def streamd(data: bytes) -> None:
            if data[:12] == b'{"op":"post"':
                keep_t(now())
                keep(data)
                keep_sub(sub)
                sub.last = data
                return
            frame = loads(data)
            op = frame.get("op")
            if op == "post":  # another spelling: read after the step like the others
                keep_t(now())
                keep(data)
                keep_sub(sub)
                sub.last = data
            elif op == "subscribed":
                if sub.cursor is None:
                    sub.cursor = frame.get("cursor")
                _set_live(sub)
            elif op == "error":
                # A refused subscribe (a busy gateway): retry, as a real client would.
                sub.retries += 1
                unexpected[f"error:{frame.get('code')}"] += 1
                asyncio.get_running_loop().call_later(0.05 + random.random() * 0.2, self._subscribe_streamd, sub)
            elif op != "heartbeat":
                unexpected[f"op:{op}"] += 1

        def socketio(data: bytes) -> None:
            if data[:9] == b'42["post"':
                keep_t(now())
                keep(data)
                keep_sub(sub)
                return
            if data[:2] == b"42":
                event = loads(data[2:])
                if event[0] == "post":
                    keep_t(now())
                    keep(data)
                    keep_sub(sub)
                else:
                    unexpected[f"event:{event[0]}"] += 1
            elif data == b"2":
                sub.client.send_text(b"3")  # type: ignore[union-attr]
            elif data[:1] == b"0":
                sub.state = 1
                sub.client.send_text(b"40")  # type: ignore[union-attr]
            elif data[:2] == b"40":
                sub.state = 2
                sub.client.send_text(b"420" + orjson.dumps(["join", feed_name(sub.feed)]))  # type: ignore[union-attr]
            elif data[:3] == b"430":
                sub.state = 3
                _set_live(sub)
            elif data[:2] == b"44":
                unexpected["connect_error"] += 1
            else:
                unexpected[f"eio:{data[:2]!r}"] += 1

        def channels(data: bytes) -> None:
            if data[:12] == b'{"op":"post"':
                keep_t(now())
                keep(data)
                keep_sub(sub)
                return
            frame = loads(data)
            op = frame.get("op")
            if op == "post":
                keep_t(now())
                keep(data)
                keep_sub(sub)
            elif op == "joined":
                _set_live(sub)
            else:
                unexpected[f"op:{op}"] += 1

        return {"streamd": streamd, "socketio": socketio, "channels": channels}[self.engine]

    def _subscribe_streamd(self, sub: Sub) -> None:
        if sub.client is None or sub.client.transport is None or sub.client.transport.is_closing():
            return
        request: dict[str, Any] = {"op": "subscribe", "ref": sub.index, "feed": feed_name(sub.feed)}
        cursor = self.cursor(sub)
        if cursor is not None:
            request["cursor"] = cursor
        sub.client.send_text(orjson.dumps(request))

    def _on_close(self, sub: Sub) -> Callable[[WSClient], None]:
        def closed(client: WSClient) -> None:
            if client is sub.client:
                self.closed[str(client.close_code)] += 1

        return closed

    # -- commands ------------------------------------------------------------------------

    async def _open_one(self, sub: Sub, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        sub.live = loop.create_future()
        sub.state = 0
        on_close = self._on_close(sub)

        def created(client: WSClient) -> None:
            sub.client = client
            client.on_close = on_close

        client = await connect(self.host, self.port, PATHS[self.engine], self._on_text(sub), timeout, created)
        if self.engine == "streamd":
            self._subscribe_streamd(sub)
        elif self.engine == "channels":
            client.send_text(orjson.dumps({"op": "join", "room": feed_name(sub.feed)}))
        # socketio: the server speaks first (`0{...}`); _on_text walks the handshake.
        await asyncio.wait_for(asyncio.shield(sub.live), timeout)

    async def open(self, cmd: dict[str, Any]) -> Reply:
        """Connect and join every assigned subscriber, `concurrency` at a time."""
        self.engine = cmd["engine"]
        self.raw_kind = 2 if self.engine == "socketio" else 0
        self.host, self.port = cmd["host"], cmd["port"]
        self.feeds = cmd["feeds"]
        gate = asyncio.Semaphore(cmd["concurrency"])
        timeout: float = cmd["timeout_s"]

        async def one(sub: Sub) -> None:
            async with gate:
                await self._open_one(sub, timeout)

        subs = [Sub(i, f) for i, f in cmd["subs"]]
        self.subs += subs
        began = time.monotonic()
        await asyncio.gather(*(one(s) for s in subs))
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        self.loop_lag.start()
        if self._bound is None:
            self._bound = asyncio.create_task(self._keep_bounded())
        return {"ok": True, "opened": len(subs), "seconds": round(time.monotonic() - began, 3)}

    async def storm(self, cmd: dict[str, Any]) -> Reply:
        """Drop every socket at once (client side, as a network blip would), reconnect all at once.

        Time to live: from the drop to each subscriber's `subscribed` / join ack.
        streamd resumes from the last cursor each subscriber saw; the peers rejoin
        (they have no cursor), so what was posted meanwhile is lost to them.
        """
        timeout: float = cmd["timeout_s"]
        t0 = time.monotonic_ns()
        for s in self.subs:
            client, s.client = s.client, None  # its close is the storm's, not the server's
            if client is not None:
                client.abort()
        await asyncio.sleep(0)
        for s in self.subs:
            s.retries = 0

        async def one(sub: Sub) -> int:
            for attempt in range(20):
                try:
                    await self._open_one(sub, timeout)
                    return time.monotonic_ns() - t0
                except (OSError, TimeoutError, ConnectionError):
                    sub.retries += 1
                    await asyncio.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
            raise RuntimeError(f"subscriber {sub.index} could not reconnect")

        times = await asyncio.gather(*(one(s) for s in self.subs))
        return {
            "ok": True,
            "reconnected": len(times),
            "all_live_ms": round(max(times) / 1e6, 3) if times else None,
            "live_ms": summary_ms(list(times)),
            "retries": sum(s.retries for s in self.subs),
        }

    def _received(self, lo: int, hi: int) -> int:
        return sum(1 for s in self.seqs if lo <= s < hi)

    async def collect(self, cmd: dict[str, Any]) -> Reply:
        """As `bench.loadgen.Subscribers.collect`: settle, then latencies, window count, loss, dups."""
        lo: int = cmd["lo"]
        hi: int = cmd["hi"]
        w0: int = cmd["w0_ns"]
        w1: int = cmd["w1_ns"]
        failed = set(cmd["failed"])
        feeds = self.feeds
        accepted_per_feed = Counter(s % feeds for s in range(lo, hi) if s not in failed)
        expected = sum(accepted_per_feed[s.feed] for s in self.subs)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + cmd["max_wait_s"]
        # Frames are read (`_parse`) once they have all come, or stopped coming:
        # reading them while some are still in flight would delay those.
        last_n, last_change = len(self.seqs) + len(self.raw), loop.time()
        while loop.time() < deadline:
            n = len(self.seqs) + len(self.raw)
            if n != last_n:
                last_n, last_change = n, loop.time()
            elif loop.time() - last_change >= cmd["quiet_s"]:
                break
            if n >= expected:
                await self._parse()
                if self._received(lo, hi) >= expected:
                    break
            await asyncio.sleep(0.05)
        await self._parse()

        latencies: list[int] = []
        seconds: list[int] = []
        in_window = 0
        for seq, scheduled, received in zip(self.seqs, self.sched, self.recv, strict=True):
            if seq < lo:
                continue
            if w0 <= scheduled < w1:
                latencies.append(received - scheduled)
                seconds.append((scheduled - w0) // 1_000_000_000)
            if w0 <= received < w1:
                in_window += 1
        for rows in (self.seqs, self.sched, self.recv):
            del rows[:]
        unexpected, self.unexpected = dict(self.unexpected), Counter()

        lost = dup = 0
        for sub in self.subs:
            counts = sub.counts
            for seq in range(lo + (sub.feed - lo) % feeds, hi, feeds):
                if seq in failed:
                    continue
                slot = seq // feeds
                c = counts[slot] if slot < len(counts) else 0
                if c == 0:
                    lost += 1
                elif c > 1:
                    dup += c - 1
        return {
            "ok": True,
            "latencies_ns": latencies,
            "seconds": seconds,
            "loop_lag_ns": self.loop_lag.take(w0, w1),
            "received_in_window": in_window,
            "expected": expected,
            "lost": lost,
            "dup": dup,
            "closed": dict(self.closed),
            "unexpected": unexpected,
        }


def _set_live(sub: Sub) -> None:
    if sub.live is not None and not sub.live.done():
        sub.live.set_result(None)


async def serve() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer
    load = Load()
    handlers = {"open": load.open, "collect": load.collect, "storm": load.storm}
    try:
        while line := await reader.readline():
            cmd = orjson.loads(line)
            try:
                reply = await handlers[cmd["cmd"]](cmd)
            except Exception as err:
                log.exception("command %s failed", cmd.get("cmd"))
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            out.write(orjson.dumps(reply) + b"\n")
            out.flush()
    finally:
        with contextlib.suppress(Exception):
            await load.close()
    return 0


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve())


if __name__ == "__main__":
    sys.exit(main())
