"""Ingest: how many `POST /v1/posts` one gateway process accepts, and at what CPU cost.

One run starts a private Redis and one `streamd gateway` (the gateway alone on
CPU 0; Redis, this process and the load generator on CPU 1), creates U users,
then for each offered rate has the load generator post for warmup + duration
seconds over N keep-alive HTTP/1.1 connections (each posting as one of the
users, requests pipelined on the connection) and measures over the window:

- posts accepted per second (201) and every other answer, by status;
- latency from each request's write to its answer; in the results, `behind`
  counts the scheduler's ticks (1 ms) that could not send all that was due
  because every connection already had `--depth` requests in flight (then
  the offered rate was not offered);
- gateway CPU microseconds per accepted post, from /proc/<pid>/stat, and
  Redis's and the load generator's CPU; `cap/s` is 10^6 / (gateway us per
  post): the posts per second one core would accept at that cost, the number
  to compare when the machine is shared and the gateway waits for a CPU.

An offered rate of 0 means "as fast as the gateway answers": each connection
keeps `--depth` requests in flight (closed loop).

No fan-out worker runs unless `--fanout`: the ingest stream just grows for
the length of the run.

`--publisher` measures the backend path instead (`streamd.publisher.Publisher`,
no HTTP): the process posting is the one under test, alone on CPU 0 in place
of the gateway (which only created the users), with `--connections` x
`--depth` posts in flight; `gw` in the table is then that process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import secrets
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import orjson

from bench.harness import (
    CLOCK_TICKS,
    REPO_ROOT,
    BenchError,
    Child,
    Pinning,
    ServerUnderTest,
    snapshot,
    terminate_on_sigterm,
)
from bench.stats import cpu_percent, micros_per, summary_ms

HELP = "HTTP ingest: posts accepted per second by one gateway process, its CPU per post, latency"
SERVER_ENV = {
    "STREAMD_POSTS_PER_MINUTE": str(10**9),
    "STREAMD_CONNECTIONS_PER_SECOND": str(10**9),
    "STREAMD_CONNECTIONS_BURST": str(10**9),
}
LATENCY_SAMPLES = 200_000  # kept per run: a uniform reservoir past that
TICK_S = 0.001  # the open-loop scheduler's period


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="1000,3000,0", help="offered posts/s, comma-separated; 0: closed loop (default %(default)s)")
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections (default %(default)s)")
    p.add_argument("--users", type=int, default=16, help="posting users (default %(default)s)")
    p.add_argument("--depth", type=int, default=8, help="requests in flight per connection at most (default %(default)s)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per rate (default %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring (default %(default)s)")
    p.add_argument("--idempotency", action="store_true", help="send an idempotency key with every post")
    p.add_argument("--fanout", action="store_true", help="also run a fan-out worker (on the CPU of Redis)")
    p.add_argument(
        "--publisher", action="store_true",
        help="post with streamd.publisher.Publisher from a process on CPU 0 instead of HTTP to the gateway",
    )  # fmt: skip
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra STREAMD_* setting for the gateway")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/ingest-<timestamp>.json)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")


def run(args: argparse.Namespace) -> int:
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    started = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or REPO_ROOT / "bench" / "results" / f"ingest-{started:%Y%m%d-%H%M%S}.json"
    extra = dict(item.split("=", 1) for item in args.env)
    pinning = Pinning.two_cores()
    workdir = Path(tempfile.mkdtemp(prefix="streamd-ingest-"))
    rows: list[dict[str, Any]] = []
    with terminate_on_sigterm(), contextlib.ExitStack() as stack:
        server = ServerUnderTest(workdir, pinning, {**SERVER_ENV, **extra}, with_fanout=args.fanout)
        server.start(stack)
        # The publisher is the process under test: on the gateway's CPU, in its place.
        cpus = pinning.gateway if args.publisher else pinning.rest
        loadgen = Child("loadgen", [sys.executable, "-m", "bench.ingest"], workdir / "loadgen.log", cpus)
        stack.callback(loadgen.stop)
        tokens, handles = asyncio.run(_create_users(server.base_url, server.admin_token, args.users))
        if args.publisher:
            assert server.redis is not None
            print(f"publisher (pid {loadgen.pid}) on {server.redis.url}, {args.users} authors,"
                  f" {args.connections * args.depth} posts in flight")
        else:
            print(f"gateway {server.base_url} (pid {server.gateway.pid if server.gateway else '?'}), {args.users} users,"
                  f" {args.connections} connections, depth {args.depth}")
        print(f"{'offered/s':>10} {'accepted/s':>11} {'gw us/post':>11} {'gw cpu%':>8} {'redis us/post':>13}"
              f" {'lg cpu%':>8} {'cap/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for rate in rates:
            row = _one_rate(server, loadgen, (tokens, handles), rate, args)
            rows.append(row)
            lat = row["latency_ms"]
            print(f"{rate or 'max':>10} {row['accepted_per_s']:>11.0f} {_fmt(row['gateway_us_per_post']):>11}"
                  f" {row['gateway_cpu_percent']:>8.1f} {_fmt(row['redis_us_per_post']):>13}"
                  f" {row['loadgen_cpu_percent']:>8.1f} {_fmt(row['capacity_per_s']):>7} {_fmt(lat['p50']):>8} {_fmt(lat['p99']):>8}"
                  f" {row['errors']:>7}", flush=True)
            if row["error_statuses"]:
                print(f"{'':>10} errors by status: {row['error_statuses']}")
        issues = server.log_issues()
        if not args.keep:
            stack.callback(_rmtree, workdir)
    results = {
        "scenario": "ingest",
        "started": started.isoformat(),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "pinned": pinning.gateway is not None},
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("func",)},
        "rows": rows,
        "log_issues": issues,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"\nresults: {out}")
    for name, lines in issues.items():
        print(f"{name} log:\n  " + "\n  ".join(lines))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _one_rate(
    server: ServerUnderTest, loadgen: Child, users: tuple[list[str], list[str]], rate: int, args: argparse.Namespace
) -> dict[str, Any]:
    tokens, handles = users
    assert server.redis is not None
    loadgen.send(
        "run",
        url=server.base_url,
        redis_url=server.redis.url if args.publisher else None,
        authors=handles,
        tokens=tokens,
        rate=rate,
        connections=args.connections,
        depth=args.depth,
        warmup=args.warmup,
        duration=args.duration,
        idempotency=args.idempotency,
    )
    loadgen.receive(args.warmup + 30)  # the measured window starts
    pids = {**server.pids(), "loadgen": loadgen.pid}
    if args.publisher:  # it is what is measured, under the gateway's name; the idle gateway is left out
        pids["gateway"] = pids.pop("loadgen")
    before = snapshot(pids)
    loadgen.receive(args.duration + 30)  # it ends
    after = snapshot(pids)
    stats = loadgen.receive(60)
    server.check_alive()
    seconds = (after.at_ns - before.at_ns) / 1e9
    ticks = {name: after.procs.get(name, 0) - before.procs.get(name, 0) for name in pids}
    accepted = stats["accepted"]
    errors = sum(stats["statuses"].values()) - accepted + stats["failures"]
    return {
        "offered_per_s": rate,
        "seconds": round(seconds, 3),
        "sent": stats["sent"],
        "accepted": accepted,
        "accepted_per_s": accepted / seconds if seconds else 0.0,
        "errors": errors,
        "error_statuses": {k: v for k, v in stats["statuses"].items() if k != "201"} | (
            {"connection": stats["failures"]} if stats["failures"] else {}
        ),
        "gateway_us_per_post": micros_per(ticks.get("gateway", 0), CLOCK_TICKS, accepted),
        # What one core would take at this CPU cost: the number to read on a busy machine.
        "capacity_per_s": 1e6 / gw_us if (gw_us := micros_per(ticks.get("gateway", 0), CLOCK_TICKS, accepted)) else None,
        "gateway_cpu_percent": cpu_percent(ticks.get("gateway", 0), CLOCK_TICKS, seconds),
        "redis_us_per_post": micros_per(ticks.get("redis", 0), CLOCK_TICKS, accepted),
        "redis_cpu_percent": cpu_percent(ticks.get("redis", 0), CLOCK_TICKS, seconds),
        "loadgen_cpu_percent": cpu_percent(ticks.get("loadgen", 0), CLOCK_TICKS, seconds),
        "latency_ms": summary_ms(stats["latencies_ns"]),
        "behind": stats["behind"],
    }


async def _create_users(base_url: str, admin: str, n: int) -> tuple[list[str], list[str]]:
    """The users' tokens and handles."""
    import aiohttp

    tokens, handles = [], []
    suffix = secrets.token_hex(3)
    async with aiohttp.ClientSession(base_url, headers={"Authorization": f"Bearer {admin}"}) as session:
        for i in range(n):
            handle = f"b{suffix}_{i}"
            async with session.post("/v1/users", json={"handle": handle}) as resp:
                if resp.status != 201:
                    raise BenchError(f"creating a user: {resp.status} {await resp.text()}")
                tokens.append((await resp.json())["token"])
                handles.append(handle)
    return tokens, handles


# -- the load generator (a child process speaking JSON lines) --------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: requests pipelined, answers parsed in order."""

    def __init__(self, gen: _Load) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.inflight: deque[int] = deque()  # scheduled send time (ns) of each request awaiting its answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.failures += len(self.inflight)
        self.inflight.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        now = time.monotonic_ns()
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buf[:head_end]
            length = 0
            at = head.find(b"\r\nContent-Length: ")
            if at < 0:
                at = head.lower().find(b"\r\ncontent-length: ")
            if at >= 0:
                end = head.find(b"\r\n", at + 2)
                length = int(head[at + 18 : end if end >= 0 else len(head)])
            total = head_end + 4 + length
            if len(buf) < total:
                break
            status = head[9:12].decode()
            buf = buf[total:]
            scheduled = self.inflight.popleft()
            self.gen.answered(status, now - scheduled)
        self.buf = buf
        self.gen.wake()


class _Load:
    def __init__(self, cmd: dict[str, Any]) -> None:
        self.cmd = cmd
        self.statuses: Counter[str] = Counter()
        self.failures = 0
        self.sent = 0
        self.accepted = 0
        self.latencies: list[int] = []
        self.seen = 0
        self.measuring = False
        self.free = asyncio.Event()
        self.rng = __import__("random").Random(7)

    def wake(self) -> None:
        self.free.set()

    def stats(self, behind: int) -> dict[str, Any]:
        """The reply that ends a run."""
        return {
            "ok": True,
            "sent": self.sent,
            "accepted": self.accepted,
            "statuses": dict(self.statuses),
            "failures": self.failures,
            "latencies_ns": self.latencies,
            "behind": behind,
        }

    def answered(self, status: str, latency_ns: int) -> None:
        if not self.measuring:
            return
        self.statuses[status] += 1
        if status == "201":
            self.accepted += 1
        self.seen += 1
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(latency_ns)
        else:
            slot = self.rng.randrange(self.seen)
            if slot < LATENCY_SAMPLES:
                self.latencies[slot] = latency_ns


def _request(host: str, token: str, n: int, idempotency: bool) -> bytes:
    post: dict[str, Any] = {"text": f"bench post {n} " + "x" * 60, "events": ["bench"]}
    if idempotency:
        post["idempotency_key"] = secrets.token_hex(16)
    body = orjson.dumps(post)
    return (
        f"POST /v1/posts HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _run_load(cmd: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    url = cmd["url"].removeprefix("http://")
    host, _, port = url.partition(":")
    gen = _Load(cmd)
    conns = []
    for i in range(cmd["connections"]):
        _, proto = await loop.create_connection(lambda: _Conn(gen), host, int(port))
        conns.append((proto, cmd["tokens"][i % len(cmd["tokens"])]))
    depth, rate, idem = cmd["depth"], cmd["rate"], cmd["idempotency"]
    # A few distinct bodies per connection, reused: building requests is not what is measured.
    bodies = {id(p): [_request(url, t, k, False) for k in range(4)] for p, t in conns}
    counter = 0

    def send(proto: _Conn, token: str, scheduled: int) -> None:
        nonlocal counter
        counter += 1
        data = _request(url, token, counter, True) if idem else bodies[id(proto)][counter & 3]
        assert proto.transport is not None
        proto.inflight.append(scheduled)
        proto.transport.write(data)
        gen.sent += 1

    start = time.monotonic()
    measure_at = start + cmd["warmup"]
    end_at = measure_at + cmd["duration"]
    behind = 0
    owed = 0.0
    last = start
    rr = 0
    while True:
        now = time.monotonic()
        if not gen.measuring and now >= measure_at:
            gen.measuring = True
            _reply({"ok": True, "phase": "measure"})
        if now >= end_at:
            break
        if rate:
            owed += (now - last) * rate
            last = now
            due = int(owed)
            now_ns = time.monotonic_ns()
            sent_now = 0
            for _ in range(len(conns)):
                if sent_now >= due:
                    break
                proto, token = conns[rr % len(conns)]
                rr += 1
                while sent_now < due and proto.transport is not None and len(proto.inflight) < depth:
                    send(proto, token, now_ns)
                    sent_now += 1
            owed -= sent_now
            if sent_now < due:
                behind += 1
                owed = min(owed, rate)  # at most a second of backlog
            await asyncio.sleep(TICK_S)
        else:
            now_ns = time.monotonic_ns()
            for proto, token in conns:
                while proto.transport is not None and len(proto.inflight) < depth:
                    send(proto, token, now_ns)
            gen.free.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gen.free.wait(), 0.1)
    gen.measuring = False
    _reply({"ok": True, "phase": "end"})
    # Let answers in flight arrive, then close.
    deadline = time.monotonic() + 5
    while any(p.inflight for p, _ in conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for proto, _ in conns:
        if proto.transport is not None:
            proto.transport.close()
    _reply(gen.stats(behind))


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
    sys.stdout.buffer.flush()


async def _run_publisher(cmd: dict[str, Any]) -> None:
    """`_run_load`'s measure for `Publisher.post`: `connections` x `depth` posts
    in flight (closed loop), or `rate` posts a second open loop."""
    from streamd.errors import StreamdError
    from streamd.publisher import Publisher
    from streamd.settings import Settings

    authors: list[str] = cmd["authors"]
    gen = _Load(cmd)
    rate = cmd["rate"]
    flight = cmd["connections"] * cmd["depth"]
    bodies = [{"text": f"bench post {k} " + "x" * 60, "events": ["bench"]} for k in range(4)]
    start = time.monotonic()
    measure_at = start + cmd["warmup"]
    end_at = measure_at + cmd["duration"]
    period = 1 / rate if rate else 0.0
    next_slot = 0

    async with Publisher.open(cmd["redis_url"], Settings.from_env()) as publisher:

        async def sender(k: int) -> None:
            nonlocal next_slot
            n = k
            while True:
                if rate:
                    slot = next_slot
                    next_slot += 1
                    due = start + slot * period
                    if due >= end_at:
                        return
                    if (wait := due - time.monotonic()) > 0:
                        await asyncio.sleep(wait)
                elif time.monotonic() >= end_at:
                    return
                sent = time.monotonic_ns()
                gen.sent += 1
                n += flight
                try:
                    if cmd["idempotency"]:
                        body: dict[str, Any] = {**bodies[n & 3], "idempotency_key": secrets.token_hex(16)}
                    else:
                        body = bodies[n & 3]
                    await publisher.post(authors[n % len(authors)], body)
                    gen.answered("201", time.monotonic_ns() - sent)
                except StreamdError as err:
                    gen.answered(str(err.status), time.monotonic_ns() - sent)

        async def phases() -> None:
            await asyncio.sleep(max(0.0, measure_at - time.monotonic()))
            gen.measuring = True
            _reply({"ok": True, "phase": "measure"})
            await asyncio.sleep(max(0.0, end_at - time.monotonic()))
            gen.measuring = False
            _reply({"ok": True, "phase": "end"})

        await asyncio.gather(phases(), *(sender(k) for k in range(flight)))
    _reply(gen.stats(behind=0))


async def _child_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = orjson.loads(line)
        if cmd["cmd"] == "run":
            try:
                await (_run_publisher(cmd) if cmd.get("redis_url") else _run_load(cmd))
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                _reply({"ok": False, "error": repr(exc)})


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(_child_main())
    except ImportError:
        asyncio.run(_child_main())
