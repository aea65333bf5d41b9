"""The fan-out worker alone: CPU per post of `streamd fanout` and of Redis.

A private Redis (`streamd.embedded.EmbeddedRedis`, no AOF unless `--aof`)
and one `streamd fanout` process, both pinned to one CPU (`--cpu`). Posts
are written the way `ingest_post.lua` writes them (`{a, d, l}`), over F
author feeds `user:h<k>`, each post also tagged with `--events` event feeds.

This process writes the posts on `--load-cpu` (default: the same CPU, as
in the end-to-end benchmarks, where one core holds Redis, the worker and
the load generator). Two modes per feed count:

- backlog: N posts are queued before the worker starts; CPU from its
  ready line until the stream is drained (full batches: the best case);
- steady: posts arrive open-loop at a fixed rate (written every
  millisecond, as due) for `--seconds`; CPU over the whole window and the
  time each feed item took from acceptance to its feed (entry ids are
  millisecond times, so that latency is to the millisecond).

CPU comes from /proc/<pid>/task/*/schedstat (nanoseconds). Redis CPU per
post is net of the ingest XADDs themselves (measured while filling the
backlog; for a steady rate, by writing posts at that rate with no worker
for up to two seconds first). No subscribers are connected: PUBLISH finds
no one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.harness import REPO_ROOT, BenchError, stop_process, terminate_on_sigterm
from streamd import keys
from streamd.embedded import EmbeddedRedis

HELP = "fan-out worker alone: worker and Redis CPU per post, backlog and steady rates"
READY = b"fan-out worker"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--posts", type=int, default=20_000, help="posts in the backlog run (default 20000)")
    p.add_argument("--feeds", default="10,1000", help="author feed counts, comma-separated (default 10,1000)")
    p.add_argument("--events", type=int, default=0, help="event feeds per post, out of 10 (default 0)")
    p.add_argument("--rates", default="100,1000,5000,10000", help="steady rates in posts/s, comma-separated; '' for none")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each steady run (default 5)")
    p.add_argument("--cpu", type=int, default=1, help="CPU for Redis and the worker (default 1)")
    p.add_argument(
        "--load-cpu",
        type=int,
        default=None,
        help="CPU for this process, which writes the posts (default: --cpu, as in the end-to-end benchmarks)",
    )
    p.add_argument("--batch", type=int, default=None, help="STREAMD_FANOUT_BATCH for the worker")
    p.add_argument("--aof", action="store_true", help="Redis with appendonly (fsync every second)")
    p.add_argument("--text-bytes", type=int, default=120, help="post text length (default 120)")
    p.add_argument("--profile", default=None, help="py-spy record the first worker run (.svg: flamegraph, else collapsed stacks)")
    p.add_argument("--no-backlog", action="store_true", help="skip the backlog runs")
    p.add_argument("--worker-src", default=None, help="run the worker from this source tree (e.g. an older commit's)")


def run(args: argparse.Namespace) -> int:
    feeds = [int(f) for f in args.feeds.split(",") if f.strip()]
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    os.sched_setaffinity(0, {args.cpu if args.load_cpu is None else args.load_cpu})
    rows: list[dict[str, Any]] = []
    with terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", appendonly=args.aof)
        server.start()
        try:
            _pin_all(server.proc.pid if server.proc else 0, {args.cpu})
            client = redis.Redis.from_url(server.url)
            for f in feeds:
                if not args.no_backlog:
                    rows.append(_backlog(args, server, client, f, Path(tmp)))
                    _print_row(rows[-1])
                for rate in rates:
                    rows.append(_steady(args, server, client, f, rate, Path(tmp)))
                    _print_row(rows[-1])
            client.close()
        finally:
            server.stop()
    _print_table(rows)
    out = REPO_ROOT / "bench" / "results" / f"worker-{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({"args": vars(args), "environment": _environment(), "runs": rows}, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {out.relative_to(REPO_ROOT)}")
    return 0


# -- the two modes ----------------------------------------------------------------


def _backlog(args: argparse.Namespace, server: EmbeddedRedis, client: redis.Redis, feeds: int, tmp: Path) -> dict[str, Any]:
    client.flushall()
    redis_pid = _pid(server)
    before = cpu_ns(redis_pid)
    for lo in range(0, args.posts, 1000):
        _write_posts(client, args, feeds, range(lo, min(args.posts, lo + 1000)))
    ingest_ns = (cpu_ns(redis_pid) - before) / args.posts
    last = _last_id(client)
    with _worker(args, server, tmp) as worker:
        t0, w0, r0 = time.monotonic(), cpu_ns(worker.pid), cpu_ns(redis_pid)
        _wait_drained(client, last, worker, timeout=60 + args.posts / 200)
        t1, w1, r1 = time.monotonic(), cpu_ns(worker.pid), cpu_ns(redis_pid)
    n = args.posts
    return _row("backlog", feeds, None, n, args.events, t1 - t0, w1 - w0, r1 - r0, ingest_ns, None)


def _steady(
    args: argparse.Namespace, server: EmbeddedRedis, client: redis.Redis, feeds: int, rate: int, tmp: Path
) -> dict[str, Any]:
    client.flushall()
    redis_pid = _pid(server)
    # The Redis cost of the ingest XADDs alone, written the same way with no
    # worker reading, to take out of the steady figure.
    alone = min(rate * 2, int(rate * args.seconds))
    before = cpu_ns(redis_pid)
    _write_at_rate(client, args, feeds, rate, alone)
    ingest_ns = (cpu_ns(redis_pid) - before) / alone
    client.flushall()
    with _worker(args, server, tmp) as worker:
        _wait_group(client)
        time.sleep(0.3)  # the worker is idle on its blocked read
        t0, w0, r0 = time.monotonic(), cpu_ns(worker.pid), cpu_ns(redis_pid)
        total = int(rate * args.seconds)
        _write_at_rate(client, args, feeds, rate, total)
        last = _last_id(client)
        _wait_drained(client, last, worker, timeout=60)
        t1, w1, r1 = time.monotonic(), cpu_ns(worker.pid), cpu_ns(redis_pid)
    latency = _latency(client, feeds, args.events)
    return _row("steady", feeds, rate, total, args.events, t1 - t0, w1 - w0, r1 - r0, ingest_ns, latency)


def _row(
    mode: str,
    feeds: int,
    rate: int | None,
    posts: int,
    events: int,
    seconds: float,
    worker_ns: int,
    redis_ns: int,
    ingest_ns: float,
    latency: dict[str, float] | None,
) -> dict[str, Any]:
    return {
        "mode": mode,
        "feeds": feeds,
        "events_per_post": events,
        "rate": rate,
        "posts": posts,
        "feed_items": posts * (1 + events),
        "seconds": round(seconds, 3),
        "posts_per_s": round(posts / seconds, 1) if seconds > 0 else None,
        "worker_us_per_post": round(worker_ns / posts / 1000, 1),
        "redis_us_per_post": round((redis_ns / posts - ingest_ns) / 1000, 1),
        "redis_ingest_us_per_post": round(ingest_ns / 1000, 1),
        "latency_ms": latency,
    }


# -- posts, the worker, CPU --------------------------------------------------------


def _write_posts(client: redis.Redis, args: argparse.Namespace, feeds: int, seqs: range) -> None:
    text = ("x" * args.text_bytes)[: args.text_bytes]
    with client.pipeline(transaction=False) as pipe:
        for i in seqs:
            events = [f"ev{(i + k) % 10}" for k in range(args.events)]
            body = orjson.dumps({"text": f"{i} {text}", "events": events, "media": []})
            pipe.xadd(keys.ingest_stream(), {"a": f"h{i % feeds}", "d": body, "l": b"[]"})
        pipe.execute()


def _write_at_rate(client: redis.Redis, args: argparse.Namespace, feeds: int, rate: int, total: int) -> None:
    """Open loop: every millisecond, the posts due by then."""
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            _write_posts(client, args, feeds, range(sent, due))
            sent = due
        time.sleep(0.001)


@contextlib.contextmanager
def _worker(args: argparse.Namespace, server: EmbeddedRedis, tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    cwd = REPO_ROOT
    if args.worker_src:
        cwd = Path(args.worker_src).resolve()
        env["PYTHONPATH"] = str(cwd)
    if args.batch:
        env["STREAMD_FANOUT_BATCH"] = str(args.batch)
    argv = ["taskset", "-c", str(args.cpu), sys.executable, "-m", "streamd", "fanout", "--redis-url", server.url]
    log = open(tmp / "worker.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=cwd, env=env)
    spy: subprocess.Popen[bytes] | None = None
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if READY not in line:
            raise BenchError(f"streamd fanout did not start ({line!r}); see {tmp / 'worker.log'}")
        if args.profile:
            fmt = "flamegraph" if args.profile.endswith(".svg") else "raw"
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen(
                [py_spy, "record", "-o", args.profile, "-p", str(proc.pid), "-r", "200", "-f", fmt],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            args.profile = None  # one profile per bench run
            time.sleep(1.0)
        yield proc
    finally:
        stop_process(proc)
        if spy is not None:
            spy.wait(30)
        log.close()


def _last_id(client: redis.Redis) -> bytes:
    newest: Any = client.xrevrange(keys.ingest_stream(), count=1)
    entry_id: bytes = newest[0][0]
    return entry_id


def _wait_group(client: redis.Redis, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ResponseError):
            if client.xinfo_groups(keys.ingest_stream()):
                return
        time.sleep(0.01)
    raise BenchError("the worker did not create its consumer group")


def _wait_drained(client: redis.Redis, last: bytes, worker: subprocess.Popen[bytes], timeout: float) -> None:
    """Until the group has delivered `last` and nothing is pending."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise BenchError(f"streamd fanout exited with {worker.returncode}")
        groups = client.xinfo_groups(keys.ingest_stream())
        if groups and groups[0]["last-delivered-id"] == last and groups[0]["pending"] == 0:
            return
        time.sleep(0.005)
    raise BenchError(f"the worker did not drain the ingest stream within {timeout:.0f}s")


def _latency(client: redis.Redis, feeds: int, events: int) -> dict[str, float]:
    """Acceptance (post id) to feed entry, over every feed item, in ms."""
    names = [f"user:h{k}" for k in range(feeds)] + [f"event:ev{k}" for k in range(10 if events else 0)]
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.xrange(keys.feed_stream(name))
        replies = pipe.execute()
    lags = sorted(
        int(entry_id.partition(b"-")[0]) - int(fields[b"pid"].partition(b"-")[0])
        for entries in replies
        for entry_id, fields in entries
    )
    if not lags:
        return {}

    def pct(q: float) -> float:
        return float(lags[min(len(lags) - 1, int(q * len(lags)))])

    return {"p50": pct(0.5), "p99": pct(0.99), "max": float(lags[-1]), "items": len(lags)}


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, in nanoseconds (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def _pin_all(pid: int, cpus: set[int]) -> None:
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)


def _pid(server: EmbeddedRedis) -> int:
    assert server.proc is not None
    return server.proc.pid


# -- output -------------------------------------------------------------------------

COLUMNS = ("mode", "feeds", "rate", "posts", "posts/s", "worker us/post", "redis us/post", "lat p50/p99 ms")


def _cells(row: dict[str, Any]) -> list[str]:
    lat = row["latency_ms"]
    return [
        row["mode"],
        str(row["feeds"]),
        str(row["rate"] or "-"),
        str(row["posts"]),
        f"{row['posts_per_s']:.0f}",
        f"{row['worker_us_per_post']:.1f}",
        f"{row['redis_us_per_post']:.1f}",
        f"{lat['p50']:.0f}/{lat['p99']:.0f}" if lat else "-",
    ]


def _print_row(row: dict[str, Any]) -> None:
    print("  ".join(f"{c}={v}" for c, v in zip(COLUMNS, _cells(row), strict=True)), flush=True)


def _print_table(rows: list[dict[str, Any]]) -> None:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    print()
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def _environment() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "commit": commit.stdout.strip(),
    }
