"""Processes and sockets for the fault-injection suite (`tests/test_faults.py`).

Everything here is real: `streamd gateway` and `streamd fanout` subprocesses
against a private redis-server (`EmbeddedRedis`), each one stopped by its pid
(SIGKILL or SIGTERM) and all of them stopped when the `Cluster` exits, also on
failure. The clients are real sockets:

- `RawWs`: a minimal WebSocket client on a TCP socket the test owns, so its
  receive buffer can be made small (SO_RCVBUF before connect), its reading
  paused (the kernel buffers then fill and the server has to cope), and the
  connection cut with a RST.
- `Subscriber`: resumes by cursor over `RawWs` and records every frame as it
  came. It does *not* drop repeats (unlike `streamd.client.StreamClient`), so
  a duplicate sent by the server shows up in the tallies.
- `SseSubscriber`: the same over Server-Sent Events with `Last-Event-ID`.
- `Poster`: posts with an idempotency key and retries on another gateway
  until it gets 201, so every post that was sent ends up accepted exactly
  once and the expected contents of every feed are known exactly.
- `Proxy`: a TCP proxy whose connections can be cut (RST to the client).

Waiting is always on an event (a frame, a line of output) or a bounded poll;
the only sleeps are retry back-offs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import random
import re
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import orjson
import redis.asyncio as aioredis

from streamd.embedded import EmbeddedRedis

ADMIN = "fault-admin-token"

# Limits that would get in the way of a test that opens many sockets and posts
# fast from one address; a dead worker's entries are claimed after 0.5 s.
BASE_ENV = {
    "STREAMD_ADMIN_TOKEN": ADMIN,
    "STREAMD_POSTS_PER_MINUTE": "10000000",
    "STREAMD_CONNECTIONS_PER_SECOND": "100000",
    "STREAMD_CONNECTIONS_BURST": "100000",
    "STREAMD_FRAMES_PER_SECOND": "10000",
    "STREAMD_FRAMES_BURST": "10000",
    "STREAMD_CLAIM_IDLE_MS": "500",
    "STREAMD_CLAIM_EVERY_SECONDS": "0.2",
}


def _die_with_parent() -> None:
    """In the child: SIGKILL if the test process dies, so nothing outlives it (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def poll(check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05) -> None:
    """Bounded readiness poll: `check()` until true, else AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)


# -- processes ----------------------------------------------------------------------


class Proc:
    """One `streamd` subprocess; its output (stdout and stderr) is kept in a ring."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []  # all of its output
        self.changes = Changes()  # pulsed on every line
        self._drain: asyncio.Task[None] | None = None
        self.signalled: int | None = None  # the signal the test sent, if any

    async def start(self, ready: str, timeout: float = 30.0) -> str:
        """Start it and return the first output line containing `ready`."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            preexec_fn=_die_with_parent,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), max(remaining, 0.01))
            except TimeoutError:
                await self.close()
                raise AssertionError(f"{self.name} not ready after {timeout:g} s:\n{self.tail()}") from None
            if not raw:
                await self.close()
                raise AssertionError(f"{self.name} exited before it was ready:\n{self.tail()}")
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if ready in line:
                break
        # Keep reading: a child blocked on a full pipe would look like a hang.
        self._drain = asyncio.create_task(self._read_rest())
        return line

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode(errors="replace").rstrip())
            self.changes.pulse()

    async def wait_line(self, text: str, timeout: float, since: int = 0) -> str:
        """The first line from index `since` on that contains `text` (waits for it)."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines[since:] if text in line][:1]
            return bool(found)

        await self.changes.until(seen, timeout, f"{self.name} to say {text!r}")
        return found[0]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.alive:
            assert self.proc is not None
            self.signalled = signal.SIGKILL
            os.kill(self.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 10)
        await self._finish_drain()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM; the exit code once it has exited (AssertionError after `timeout`)."""
        assert self.proc is not None
        self.signalled = signal.SIGTERM
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} still running {timeout:g} s after SIGTERM:\n{self.tail()}") from None
        await self._finish_drain()
        return code

    async def _finish_drain(self) -> None:
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 5)

    async def close(self) -> None:
        if self.alive:
            await self.kill()
        elif self.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
            with contextlib.suppress(BaseException):
                await self._drain

    def tail(self, n: int = 40) -> str:
        return "\n".join(f"  [{self.name}] {line}" for line in self.lines[-n:])

    def rss_kib(self) -> int:
        """VmRSS of the process, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class Gateway(Proc):
    url: str = ""

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)


class Worker(Proc):
    consumer: str = ""


class Cluster:
    """A private Redis and the `streamd` processes of one test; all stopped on exit."""

    def __init__(
        self,
        tmp: Path,
        *,
        env: dict[str, str] | None = None,
        appendonly: bool = False,
        redis_args: tuple[str, ...] = (),
    ) -> None:
        self.tmp = tmp
        self.env = {**BASE_ENV, **(env or {})}
        self.server = EmbeddedRedis(tmp / "redis", appendonly=appendonly, extra_args=redis_args)
        self.procs: list[Proc] = []
        self._n = 0
        self.redis: aioredis.Redis
        self.http: aiohttp.ClientSession

    @property
    def redis_url(self) -> str:
        return self.server.url

    async def __aenter__(self) -> Cluster:
        await asyncio.to_thread(self.server.start)
        self.redis = aioredis.Redis.from_url(self.redis_url)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            for proc in self.procs:
                await proc.close()
            if exc_type is not None:
                # Shown by pytest with the failure: what each process said last.
                for proc in self.procs:
                    print(f"--- {proc.name} (exit {proc.returncode}, signalled {proc.signalled})")
                    print(proc.tail(150))
        finally:
            with contextlib.suppress(Exception):
                await self.http.close()
            with contextlib.suppress(Exception):
                await self.redis.aclose()
            await asyncio.to_thread(self.server.stop)

    def child_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
        env.update(self.env)
        env.update(extra)
        return env

    async def gateway(self, port: int = 0, **env: str) -> Gateway:
        self._n += 1
        argv = [sys.executable, "-m", "streamd", "gateway", "--port", str(port), "--redis-url", self.redis_url]
        gw = Gateway(f"gateway{self._n}", argv, self.child_env(env))
        self.procs.append(gw)
        line = await gw.start("listening on")
        gw.url = line.split("listening on", 1)[1].strip()
        await self.wait_ready(gw)
        return gw

    async def worker(self, **env: str) -> Worker:
        self._n += 1
        argv = [sys.executable, "-m", "streamd", "fanout", "--redis-url", self.redis_url]
        worker = Worker(f"worker{self._n}", argv, self.child_env(env))
        self.procs.append(worker)
        line = await worker.start("fan-out worker")
        match = re.search(r"fan-out worker (\S+) on", line)
        assert match, line
        worker.consumer = match.group(1)
        return worker

    async def readyz(self, gw: Gateway, timeout: float = 5.0) -> int:
        async with self.http.get(gw.url + "/readyz", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return resp.status

    async def wait_ready(self, gw: Gateway, timeout: float = 30.0) -> None:
        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                return await self.readyz(gw) == 200
            return False

        await poll(ready, timeout, f"{gw.name} /readyz 200")

    # -- the HTTP API, as admin -------------------------------------------------

    async def call(self, gw: Gateway, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        data = orjson.dumps(body) if body is not None else None
        async with self.http.request(method, gw.url + path, data=data, headers=headers) as resp:
            raw = await resp.read()
            assert resp.status < 300, (method, path, resp.status, raw)
            return orjson.loads(raw) if raw else None

    async def user(self, gw: Gateway, handle: str) -> str:
        token: str = (await self.call(gw, "POST", "/v1/users", {"handle": handle}))["token"]
        return token

    async def public_list(self, gw: Gateway, owner_token: str, members: Iterable[str]) -> str:
        body = await self.call(gw, "POST", "/v1/lists", {"name": "faults", "visibility": "public"}, owner_token)
        list_id: str = body["list"]["id"]
        for handle in members:
            await self.call(gw, "PUT", f"/v1/lists/{list_id}/members/{handle}", None, owner_token)
        return list_id


# -- WebSocket over a raw socket --------------------------------------------------------


class WsClosed(Exception):
    """The connection ended: `code` from the server's close frame, or None (EOF, reset)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class HandshakeError(Exception):
    def __init__(self, status: int, head: bytes) -> None:
        super().__init__(f"HTTP {status}: {head[:200]!r}")
        self.status = status


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 80)


class RawWs:
    """A WebSocket client on a socket the test controls (buffer size, pauses, RST)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock: socket.socket) -> None:
        self.reader = reader
        self.writer = writer
        self.sock = sock
        self.close_code: int | None = None
        self.bytes_read = 0  # on the wire, frame headers included

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        rcvbuf: int | None = None,
        maxseg: int | None = None,
        limit: int = 1 << 16,
        timeout: float = 10.0,
    ) -> RawWs:
        """`rcvbuf`: SO_RCVBUF, set before connect so that the window advertised is
        small from the start. `maxseg`: TCP_MAXSEG, the MSS this client announces;
        the server's kernel sizes its send buffer by it (on loopback, with the
        64 KiB MSS, it grows to megabytes per socket)."""
        host, port = host_port(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if maxseg is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, maxseg)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
            reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        except BaseException:
            sock.close()
            raise
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except BaseException:
            writer.transport.abort()
            raise
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            writer.transport.abort()
            raise HandshakeError(status, head)
        return cls(reader, writer, sock)

    @property
    def local_port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def send_json(self, obj: Any) -> None:
        self.writer.write(client_frame(0x1, orjson.dumps(obj)))

    async def recv(self) -> dict[str, Any]:
        """The next text frame as JSON; pings are answered; the end raises `WsClosed`."""
        try:
            while True:
                opcode, payload = await self._frame()
                if opcode == 0x1:
                    message: dict[str, Any] = orjson.loads(payload)
                    return message
                if opcode == 0x9:
                    self.writer.write(client_frame(0xA, payload))
                elif opcode == 0x8:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.close_code = code
                    with contextlib.suppress(Exception):
                        self.writer.write(client_frame(0x8, payload[:2]))
                        self.writer.close()
                    raise WsClosed(code, payload[2:].decode(errors="replace"))
        except (asyncio.IncompleteReadError, ConnectionError) as err:
            self.writer.transport.abort()
            raise WsClosed(None, type(err).__name__) from None

    async def _frame(self) -> tuple[int, bytes]:
        """One whole message (continuations joined)."""
        parts: list[bytes] = []
        first_opcode = 0
        while True:
            b1, b2 = await self.reader.readexactly(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            mask = await self.reader.readexactly(4) if b2 & 0x80 else b""
            payload = await self.reader.readexactly(n)
            self.bytes_read += n + 2 + (2 if 126 <= n < 1 << 16 else 8 if n >= 1 << 16 else 0) + len(mask)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b1 & 0x0F
            if opcode >= 0x8:  # control frames may come between fragments
                return opcode, payload
            first_opcode = first_opcode or opcode
            parts.append(payload)
            if b1 & 0x80:
                return first_opcode, b"".join(parts)

    def pause_reading(self) -> None:
        """Stop reading the socket: from now on the kernel buffers fill up."""
        cast(asyncio.Transport, self.writer.transport).pause_reading()

    def resume_reading(self) -> None:
        cast(asyncio.Transport, self.writer.transport).resume_reading()

    def abort(self) -> None:
        """Cut the connection abruptly: a RST, no close frame, no FIN."""
        if self.writer.transport.is_closing():
            return
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        if self.writer.transport.is_closing():
            return
        with contextlib.suppress(Exception):
            self.writer.write(client_frame(0x8, struct.pack("!H", 1000)))
        self.abort()


# -- a resuming subscriber over RawWs ----------------------------------------------------


class Reconnect(Exception):
    pass


@dataclass
class Changes:
    """An event pulsed on every change; `until` waits for a predicate without polling."""

    event: asyncio.Event = field(default_factory=asyncio.Event)

    def pulse(self) -> None:
        self.event.set()

    async def until(self, pred: Callable[[], bool], timeout: float, what: str, *, check: bool = True) -> bool:
        """Wait until `pred()`; after `timeout`, AssertionError (or False with check=False,
        for a caller that goes on to report exactly what is missing)."""
        deadline = time.monotonic() + timeout
        while True:
            self.event.clear()
            if pred():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not check:
                    return False
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), remaining)


Item = tuple[str, str]  # (cursor, post id); a delete item is ("cursor", "delete:<post id>")


async def until_ready(task: asyncio.Task[None], ready: asyncio.Event, what: Callable[[], str]) -> None:
    """Wait up to 30 s for `ready`; a task that ends first raises its own error."""
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        if task in done:
            task.result()
        raise AssertionError(f"within 30 s: {what()}")


async def cancel_quietly(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


class Subscriber:
    """Subscribes to `feeds` on `url()` and resumes by cursor whenever the socket ends.

    `items[feed]` is every item frame received, in order, repeats included.
    """

    def __init__(
        self,
        name: str,
        feeds: Iterable[str],
        url: Callable[[], str],
        *,
        changes: Changes | None = None,
        rcvbuf: int | None = None,
        cursors: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.feeds = list(feeds)
        self.url = url
        self.rcvbuf = rcvbuf
        self.items: dict[str, list[Item]] = {f: [] for f in self.feeds}
        self.cursor: dict[str, str | None] = dict.fromkeys(self.feeds)
        self.cursor.update(cursors or {})
        self.arrival: dict[str, float] = {}  # post id -> time.monotonic() of its first frame
        self.gaps: list[tuple[str, str | None]] = []  # (feed, cursor it resumed from)
        self.errors: list[dict[str, Any]] = []
        self.closes: Counter[str] = Counter()
        self.connects = 0
        self.connect_failures = 0
        self.cuts = 0
        self.ws: RawWs | None = None
        self.connected_to = ""  # the URL of the current (or last) socket
        self.changes = changes or Changes()
        self.ready = asyncio.Event()  # every feed confirmed once
        self._confirmed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def reconnects(self) -> int:
        return max(self.connects - 1, 0)

    def count(self) -> int:
        return sum(len(v) for v in self.items.values())

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run(), name=f"subscriber-{self.name}")
        await until_ready(self._task, self.ready, lambda: f"subscriber {self.name} was not subscribed: {self.errors}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_quietly(self._task)
        if self.ws is not None:
            self.ws.abort()

    def cut(self) -> bool:
        """Abort the current socket (RST); the subscriber resumes on a new one."""
        if self.ws is None:
            return False
        self.cuts += 1
        self.ws.abort()
        return True

    async def _run(self) -> None:
        delay = 0.02
        while True:
            url = self.url()
            try:
                ws = await RawWs.connect(url, rcvbuf=self.rcvbuf, timeout=5)
            except (OSError, HandshakeError, TimeoutError, asyncio.IncompleteReadError):
                self.connect_failures += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # retry back-off
                delay = min(delay * 2, 0.5)
                continue
            self.ws = ws
            self.connected_to = url
            self.connects += 1
            try:
                for feed in self.feeds:
                    frame: dict[str, Any] = {"op": "subscribe", "feed": feed, "ref": feed}
                    if self.cursor[feed] is not None:
                        frame["cursor"] = self.cursor[feed]
                    ws.send_json(frame)
                while True:
                    if self._on_frame(await ws.recv()):
                        delay = 0.02
            except WsClosed as closed:
                self.closes[str(closed.code) if closed.code is not None else closed.reason] += 1
            except Reconnect as why:
                self.closes[f"reconnect: {why}"] += 1
            finally:
                self.ws = None
                ws.abort()  # a no-op after a close; on cancellation it ends the socket
            self.changes.pulse()

    def _on_frame(self, frame: dict[str, Any]) -> bool:
        op = frame.get("op")
        if op in ("post", "delete"):
            feed = frame["feed"]
            pid = frame["post"]["id"] if op == "post" else "delete:" + frame["post_id"]
            self.items[feed].append((frame["cursor"], pid))
            self.arrival.setdefault(pid, time.monotonic())
            self.cursor[feed] = frame["cursor"]
            self.changes.pulse()
        elif op == "subscribed":
            feed = frame["feed"]
            if frame["gap"]:
                self.gaps.append((feed, self.cursor[feed]))
            if self.cursor[feed] is None:
                # Nothing seen yet: the head at subscribe time is where a resume starts.
                self.cursor[feed] = frame["cursor"]
            self._confirmed.add(feed)
            if self._confirmed >= set(self.feeds):
                self.ready.set()
            self.changes.pulse()
            return True
        elif op == "error":
            self.errors.append(frame)
            self.changes.pulse()
            if frame.get("code") in ("unavailable", "rate_limited"):
                raise Reconnect(frame.get("code"))
        return False


# -- Server-Sent Events ---------------------------------------------------------------


class SseSubscriber:
    """Reads `/v1/feeds/{feed}/events` and resumes with `Last-Event-ID` when it ends."""

    def __init__(
        self,
        name: str,
        feed: str,
        url: Callable[[], str],
        http: aiohttp.ClientSession,
        *,
        cursor: str,
        changes: Changes | None = None,
    ) -> None:
        self.name = name
        self.feed = feed
        self.url = url
        self.http = http
        self.last_id = cursor  # the first request sends it as Last-Event-ID too
        self.items: list[Item] = []
        self.gaps: list[str] = []
        self.errors: list[Any] = []
        self.connects = 0
        self.connect_failures = 0
        self.ends: Counter[str] = Counter()
        self.changes = changes or Changes()
        self.streaming = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def reconnects(self) -> int:
        return max(self.connects - 1, 0)

    async def __aenter__(self) -> SseSubscriber:
        self._task = asyncio.create_task(self._run(), name=f"sse-{self.name}")
        await asyncio.wait_for(self.streaming.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_quietly(self._task)

    async def _run(self) -> None:
        delay = 0.02
        while True:
            url = f"{self.url()}/v1/feeds/{self.feed}/events"
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
                async with self.http.get(url, headers={"Last-Event-ID": self.last_id}, timeout=timeout) as resp:
                    if resp.status != 200:
                        self.errors.append((resp.status, await resp.text()))
                        raise ConnectionError(f"HTTP {resp.status}")
                    self.connects += 1
                    self.streaming.set()
                    delay = 0.02
                    await self._read(resp)
                    self.ends["eof"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError, asyncio.IncompleteReadError) as err:
                if self.connects and self.streaming.is_set():
                    self.ends[type(err).__name__] += 1
                else:
                    self.connect_failures += 1
            self.changes.pulse()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # retry back-off
            delay = min(delay * 2, 0.5)

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        fields: dict[str, str] = {}
        while raw := await resp.content.readline():
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            if not fields:
                continue
            event, data = fields.get("event"), orjson.loads(fields.get("data", "null"))
            if event in ("post", "delete"):
                pid = data["post"]["id"] if event == "post" else "delete:" + data["post_id"]
                self.items.append((fields["id"], pid))
                self.last_id = fields["id"]
            elif event == "gap":
                self.gaps.append(self.last_id)
            else:
                self.errors.append(fields)
            fields = {}
            self.changes.pulse()


# -- posting ---------------------------------------------------------------------------


@dataclass
class Sent:
    n: int
    author: str
    events: list[str]
    text: str
    key: str
    post_id: str | None = None
    replayed: bool = False
    # Every answer other than 201: (status or exception name, error code, seconds).
    refusals: list[tuple[str, str, float]] = field(default_factory=list)


class Poster:
    """Posts with an idempotency key; retries on the next gateway until 201."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        urls: Callable[[], list[str]],
        tokens: dict[str, str],
        *,
        attempt_timeout: float = 20.0,
        give_up_after: float = 90.0,
        text_size: int = 0,
    ) -> None:
        self.http = http
        self.urls = urls
        self.tokens = tokens
        self.attempt_timeout = attempt_timeout
        self.give_up_after = give_up_after
        self.pad = "x" * text_size
        self.sent: list[Sent] = []
        self.accepted = 0
        self.changes = Changes()
        self.prefix = os.urandom(3).hex()

    def by_id(self) -> dict[str, Sent]:
        return {s.post_id: s for s in self.sent if s.post_id is not None}

    async def post(self, author: str, events: list[str] | None = None) -> Sent:
        n = len(self.sent)
        sent = Sent(n, author, list(events or []), f"p{n} {self.pad}".strip(), f"{self.prefix}-{n}")
        self.sent.append(sent)
        body = orjson.dumps({"text": sent.text, "events": sent.events, "idempotency_key": sent.key})
        headers = {"Authorization": f"Bearer {self.tokens[author]}", "Content-Type": "application/json"}
        deadline = time.monotonic() + self.give_up_after
        delay = 0.05
        attempt = 0
        while True:
            urls = self.urls()
            url = urls[(n + attempt) % len(urls)]
            attempt += 1
            started = time.monotonic()
            try:
                timeout = aiohttp.ClientTimeout(total=self.attempt_timeout)
                async with self.http.post(url + "/v1/posts", data=body, headers=headers, timeout=timeout) as resp:
                    raw = await resp.read()
                    status = resp.status
                    replayed = resp.headers.get("Idempotent-Replayed") == "true"
            except (aiohttp.ClientError, OSError, TimeoutError) as err:
                sent.refusals.append((type(err).__name__, "", time.monotonic() - started))
            else:
                answer: Any = orjson.loads(raw) if raw else None
                if status == 201:
                    sent.post_id = answer["post"]["id"]
                    sent.replayed = replayed
                    self.accepted += 1
                    self.changes.pulse()
                    return sent
                code = answer.get("error", {}).get("code", "?") if isinstance(answer, dict) else "?"
                sent.refusals.append((str(status), code, time.monotonic() - started))
            if time.monotonic() > deadline:
                return sent  # never accepted: counted as such by the test
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # retry back-off
            delay = min(delay * 2, 1.0)

    def refusals(self) -> Counter[str]:
        return Counter(f"{status} {code}".strip() for s in self.sent for status, code, _ in s.refusals)

    def expected(self, lists: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
        """Feed -> ids of the accepted posts that belong to it (in accept order)."""
        out: dict[str, list[str]] = {}
        for s in self.sent:
            if s.post_id is None:
                continue
            feeds = [f"user:{s.author}", *(f"event:{e}" for e in dict.fromkeys(s.events))]
            feeds += [f"list:{lid}" for lid, members in (lists or {}).items() if s.author in members]
            for feed in feeds:
                out.setdefault(feed, []).append(s.post_id)
        return out


# -- a TCP proxy whose connections can be cut --------------------------------------------


class Proxy:
    def __init__(self, target: Callable[[], tuple[str, int]]) -> None:
        self.target = target
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.cuts = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pair in list(self.pairs):
            self._abort(pair)
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target())
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)
        try:
            await asyncio.gather(self._pump(reader, up_writer, pair), self._pump(up_reader, writer, pair))
        finally:
            self.pairs.discard(pair)

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._abort(pair)

    @staticmethod
    def _abort(pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        down, up = pair
        sock = down.get_extra_info("socket")
        if sock is not None and not down.transport.is_closing():
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        down.transport.abort()
        up.transport.abort()

    def cut_random(self, rng: random.Random) -> bool:
        """Cut one connection: the client gets a RST, the gateway an abort."""
        if not self.pairs:
            return False
        pair = rng.choice(sorted(self.pairs, key=id))
        self.pairs.discard(pair)
        self._abort(pair)
        self.cuts += 1
        return True


# -- StreamClient, the project's own resuming client ---------------------------------------


class StreamClientTally:
    """Runs a `StreamClient` and records what it yields (it drops repeats by cursor itself)."""

    def __init__(self, name: str, url: str, feeds: Iterable[str], *, changes: Changes | None = None) -> None:
        from streamd.client import StreamClient

        self.name = name
        self.feeds = list(feeds)
        self.items: dict[str, list[Item]] = {f: [] for f in self.feeds}
        self.gaps: list[str] = []
        self.reconnect_reasons: Counter[str] = Counter()
        self.subscribes = 0
        self.changes = changes or Changes()
        self.ready = asyncio.Event()
        self._confirmed: set[str] = set()
        self.client = StreamClient(
            url,
            self.feeds,
            backoff_base=0.02,
            backoff_cap=0.5,
            connect_timeout=5,
            on_subscribed=self._on_subscribed,
            on_reconnect=self._on_reconnect,
        )
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None

    @property
    def reconnects(self) -> int:
        return sum(self.reconnect_reasons.values())

    def _on_subscribed(self, feed: str, head: str) -> None:
        self.subscribes += 1
        self._confirmed.add(feed)
        if self._confirmed >= set(self.feeds):
            self.ready.set()
        self.changes.pulse()

    def _on_reconnect(self, reason: str, delay: float) -> None:
        self.reconnect_reasons[re.sub(r"\d{4,}", "N", reason)[:60]] += 1
        self.changes.pulse()

    async def __aenter__(self) -> StreamClientTally:
        await self.client.__aenter__()
        self._task = asyncio.create_task(self._consume(), name=f"streamclient-{self.name}")
        await until_ready(self._task, self.ready, lambda: f"StreamClient {self.name} not subscribed: {self.failure!r}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_quietly(self._task)
        await self.client.aclose()

    async def _consume(self) -> None:
        from streamd.client import Gap

        try:
            async for item in self.client:
                if isinstance(item, Gap):
                    self.gaps.append(item.feed)
                else:
                    pid = item.post_id if item.op == "post" else f"delete:{item.post_id}"
                    self.items[item.feed].append((item.cursor, str(pid)))
                self.changes.pulse()
        except Exception as err:  # recorded, and the tallies then show what is missing
            self.failure = err
            self.changes.pulse()


# -- what Redis holds, and the tallies ----------------------------------------------------


async def history(redis: aioredis.Redis, feed: str) -> list[Item]:
    """The feed's retained items as a subscriber would see them: (cursor, post id)."""
    from streamd import keys

    epoch: Any = await redis.hget(keys.feed_meta(feed), "epoch")
    tag = epoch.decode() if epoch else "0"
    entries: Any = await redis.xrange(keys.feed_stream(feed))
    out: list[Item] = []
    for raw_id, fields in entries:
        pid = fields[b"pid"].decode()
        out.append((f"{tag}.{raw_id.decode()}", pid if fields[b"t"] == b"post" else f"delete:{pid}"))
    return out


async def pending_total(redis: aioredis.Redis) -> int:
    from streamd import keys

    try:
        summary = await redis.xpending(keys.ingest_stream(0), keys.FANOUT_GROUP)
    except Exception:
        return -1
    return int(summary["pending"])


async def wait_fanned_out(redis: aioredis.Redis, expected: dict[str, list[str]], timeout: float) -> None:
    """Until every expected post is in its feeds and no ingest entry is pending."""

    async def done() -> bool:
        for feed, ids in expected.items():
            have = {pid for _, pid in await history(redis, feed)}
            if not have >= set(ids):
                return False
        return await pending_total(redis) == 0

    await poll(done, timeout, "the fan-out of every accepted post", every=0.1)


async def settle(
    redis: aioredis.Redis, changes: Changes, expected: dict[str, list[str]], feeds: Iterable[str],
    readers: Iterable[dict[str, list[Item]]],
) -> dict[str, list[Item]]:  # fmt: skip
    """Once every expected post is in its feeds: the feeds' histories, after
    giving every reader up to 30 s to catch up with them (without failing:
    the tallies say what is missing)."""
    await wait_fanned_out(redis, expected, 60)
    histories = {f: await history(redis, f) for f in feeds}
    readers = list(readers)
    await changes.until(lambda: all(caught_up(r, histories) for r in readers), 30, "every item", check=False)
    return histories


def caught_up(got: dict[str, list[Item]], histories: dict[str, list[Item]]) -> bool:
    """Whether a reader has the last item of every feed (items come in order: nothing more will)."""
    return all(not h or (bool(got.get(f)) and got[f][-1] == h[-1]) for f, h in histories.items())


def tally_feeds(expected: dict[str, list[str]], histories: dict[str, list[Item]]) -> tuple[dict[str, int], list[str]]:
    """Accepted posts against the feed histories: lost, duplicated, unexpected."""
    lost = duplicated = unexpected = 0
    problems: list[str] = []
    for feed in sorted(set(expected) | set(histories)):
        want = set(expected.get(feed, []))
        got = [pid for _, pid in histories.get(feed, [])]
        counts = Counter(got)
        missing = want - set(got)
        dups = {pid: n for pid, n in counts.items() if n > 1}
        extra = set(got) - want
        lost += len(missing)
        duplicated += sum(n - 1 for n in dups.values())
        unexpected += len(extra)
        if missing:
            problems.append(f"{feed}: {len(missing)} accepted post(s) missing from the history, e.g. {sorted(missing)[:3]}")
        if dups:
            problems.append(f"{feed}: post(s) in the history more than once: {dict(list(dups.items())[:3])}")
        if extra:
            problems.append(f"{feed}: {len(extra)} post(s) never accepted with 201, e.g. {sorted(extra)[:3]}")
    pairs = sum(len(v) for v in expected.values())
    return {"feed_items_expected": pairs, "lost": lost, "duplicated": duplicated, "unexpected": unexpected}, problems


def tally_reader(
    name: str, got: dict[str, list[Item]], histories: dict[str, list[Item]]
) -> tuple[dict[str, int], list[str]]:
    """What one subscriber received against the histories: each item once, in order."""
    missing = duplicated = extra = misordered = 0
    problems: list[str] = []
    for feed, want in histories.items():
        have = got.get(feed, [])
        want_ids = [pid for _, pid in want]
        have_ids = [pid for _, pid in have]
        m = set(want_ids) - set(have_ids)
        d = len(have_ids) - len(set(have_ids))
        x = set(have_ids) - set(want_ids)
        missing += len(m)
        duplicated += d
        extra += len(x)
        if have != want:
            if not m and not d and not x:
                misordered += 1
            first = next((i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b), min(len(have), len(want)))
            problems.append(
                f"{name} {feed}: got {len(have)} items, history has {len(want)}; missing {len(m)}, "
                f"duplicated {d}, unexpected {len(x)}; first difference at #{first}: "
                f"got {have[first:first + 2]} want {want[first:first + 2]}"
            )
    numbers = {"received": sum(len(v) for v in got.values()), "missing": missing, "duplicated": duplicated,
               "unexpected": extra, "feeds_misordered": misordered}  # fmt: skip
    return numbers, problems


def report(case: str, numbers: dict[str, Any]) -> None:
    """One line per case with the numbers; `pytest -s` (or -rP) shows it."""
    print(f"\nFAULT-REPORT {case}: {orjson.dumps(numbers, option=orjson.OPT_NON_STR_KEYS).decode()}")


def seeded_rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("FAULTS_SEED") or random.randrange(1 << 30))
    return random.Random(seed), seed


def established(port: int) -> int:
    """Established TCP connections whose local port is `port` (a gateway's clients)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[1].split(":")[1], 16) == port and parts[3] == "01":
            count += 1
    return count


def kernel_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(send queue, receive queue) in bytes of the IPv4 TCP socket local_port -> remote_port."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, queues = parts[1], parts[2], parts[4]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            tx, rx = queues.split(":")
            return int(tx, 16), int(rx, 16)
    return None
