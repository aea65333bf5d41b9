"""Two gateway processes and two fan-out workers on a 3-master Redis Cluster, at rising rates.

    python -m bench cluster --subscribers 1000 --feeds 10 --rates 5000,10000,20000

The production shape in small, on one machine:

- a private Redis Cluster (`streamd.embedded_cluster.EmbeddedCluster`,
  `--masters` masters, `--replicas` replicas each, no AOF), found by streamd
  from one node's URL;
- `streamd gateway --workers 2`: the system under test, two processes on one
  port (SO_REUSEPORT), alone on CPU 0; the kernel spreads the subscribers over
  them, and each process SSUBSCRIBEs once to every feed it has readers for;
- `streamd fanout --workers 2` with `STREAMD_INGEST_SHARDS` ingest shards
  (each shard read by the holder of its lease);
- a separate ingest gateway that takes the `POST /v1/posts`, as in
  `python -m bench compare`, so the SUT's CPU is the cost of delivering;
- the load generator of `compare` (`bench.loadgen` poster, `bench.subload`
  subscribers); Redis, the workers, the ingest gateway and the load
  generator share CPU 1.

Each rate step is `compare`'s (open loop, latency from the scheduled send
time, loss and duplicates per subscriber and post, retried when other
processes disturbed it). Per step: gateway CPU per delivery (both processes),
fan-out worker, Redis node and ingest CPU per post. After the steps: the
subscribers each gateway process holds, the subscribers per feed channel
that Redis sees (`PUBSUB SHARDNUMSUB`: one per gateway process with
readers), and Redis memory per node and per history entry.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import compare, engines
from bench.compare import Ctx, Shape
from bench.harness import REPO_ROOT, BenchError, Child, Pinning, terminate_on_sigterm
from bench.report import fmt
from bench.loadgen import feed_name
from streamd import keys
from streamd.embedded import free_port
from streamd.embedded_cluster import EmbeddedCluster

HELP = "2 gateway processes and 2 fan-out workers on a 3-master Redis Cluster, rising delivery rates"
_PIDS = re.compile(rb"\(pids ([\d ]+)\)")


def _csv_ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--feeds", type=int, default=10, help="subscriber i reads user:h<i %% feeds>")
    p.add_argument("--rates", type=_csv_ints, default=[5_000, 10_000, 20_000], help="target deliveries/s")
    p.add_argument("--masters", type=int, default=3)
    p.add_argument("--replicas", type=int, default=0, help="replicas per master")
    p.add_argument("--gateways", type=int, default=2, help="gateway processes (streamd gateway --workers N)")
    p.add_argument("--fanouts", type=int, default=2, help="fan-out processes (streamd fanout --workers N)")
    p.add_argument("--ingest-shards", type=int, default=2, help="STREAMD_INGEST_SHARDS")
    p.add_argument("--subload-procs", type=int, default=1, help="subscriber load generator processes")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per rate (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window (default 2)")
    p.add_argument("--settle", type=float, default=2.0, help="quiet seconds before missing deliveries are lost")
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument("--retries", type=int, default=1, help="re-runs of a step that other processes disturbed")
    p.add_argument("--quiet-wait", type=float, default=20.0, help="most seconds to wait for a quiet machine per step")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/cluster-<timestamp>.json)")


# -- the processes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pid:
    """A process this program did not start itself (a supervisor's worker): its pid is enough."""

    pid: int

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                return b") Z " not in f.read()
        except FileNotFoundError:
            return False


@dataclass(slots=True)
class ClusterRunning(engines.Running):
    """`engines.Running` for a cluster: gateway and fan-out workers behind supervisors, several Redis nodes."""

    supervisors: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    workers: dict[str, Pid] = field(default_factory=dict)  # "sut:gateway-0", "support:fanout-1", ...
    nodes: dict[str, Pid] = field(default_factory=dict)  # "support:redis-<port>"

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in {**self.workers, **self.nodes}.items()}
        out.update({f"support:{n}": p.pid for n, p in self.support.items()})
        if self.publisher is not None:
            out["publisher"] = self.publisher.pid
        return out

    def check_alive(self, workdir: Path) -> None:
        for name, proc in {**self.supervisors, **self.support}.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}; see {workdir}/{name}.log")
        for name, p in {**self.workers, **self.nodes}.items():
            if not p.alive():
                raise BenchError(f"{name} (pid {p.pid}) is gone (a supervisor restart?); see the logs in {workdir}")


def _wait_line(proc: subprocess.Popen[bytes], name: str, log: Path, pattern: re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.search(log.read_bytes())
        if found:
            return found
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise BenchError(f"{name} not ready within {timeout:.0f}s; see {log}")


def _supervised(
    stack: contextlib.ExitStack,
    workdir: Path,
    name: str,
    argv: list[str],
    env: dict[str, str],
    cpus: set[int] | None,
    n: int,
) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`streamd <command> --workers n`; the supervisor and its workers' pids (from its `Workers` line)."""
    proc = engines._spawn(stack, workdir, name, argv + ["--workers", str(n)], env, cpus)
    found = _wait_line(proc, name, workdir / f"{name}.log", _PIDS, timeout=60)
    pids = [int(p) for p in found.group(1).split()]
    if len(pids) != n:
        raise BenchError(f"{name}: {n} workers asked, pids {pids}")
    return proc, pids


def start(args: argparse.Namespace, stack: contextlib.ExitStack, workdir: Path, pinning: Pinning) -> tuple[ClusterRunning, EmbeddedCluster]:
    if pinning.rest is not None:
        os.sched_setaffinity(0, pinning.rest)  # Redis nodes and the load generator inherit it
    cluster = EmbeddedCluster(workdir / "cluster", masters=args.masters, replicas=args.replicas)
    stack.callback(cluster.stop)
    url = cluster.start()
    token = "bench-" + os.urandom(12).hex()
    env = {**engines.STREAMD_ENV, "STREAMD_ADMIN_TOKEN": token, "STREAMD_INGEST_SHARDS": str(args.ingest_shards)}
    py = [sys.executable, "-m", "streamd"]

    fanout, fanout_pids = _supervised(
        stack, workdir, "fanout", [*py, "fanout", "--redis-url", url], env, pinning.rest, args.fanouts
    )
    ingest_port = free_port()
    ingest = engines._spawn(
        stack, workdir, "ingest",
        [*py, "gateway", "--host", "127.0.0.1", "--port", str(ingest_port), "--redis-url", url],
        env, pinning.rest,
    )  # fmt: skip
    port = free_port()
    gateway, gateway_pids = _supervised(
        stack, workdir, "gateway",
        [*py, "gateway", "--host", "127.0.0.1", "--port", str(port), "--redis-url", url],
        env, pinning.gateway, args.gateways,
    )  # fmt: skip
    engines._wait_port(ingest, "ingest", ingest_port, workdir / "ingest.log")
    poster = Child("poster", [sys.executable, "-m", "bench.loadgen", "poster"], workdir / "poster.log", pinning.rest)
    stack.callback(poster.stop)
    workers = {f"sut:gateway-{i}": Pid(p) for i, p in enumerate(gateway_pids)}
    workers.update({f"support:fanout-{i}": Pid(p) for i, p in enumerate(fanout_pids)})
    nodes = {f"support:redis-{n.port}": Pid(n.proc.pid) for n in cluster.nodes if n.proc is not None}
    running = ClusterRunning(
        "streamd",
        port,
        # The gateway workers, whose RSS compare.run_step reads: it uses only `.pid`,
        # and these are the supervisor's children, not Popen objects of ours.
        {n.removeprefix("sut:"): p for n, p in workers.items() if n.startswith("sut:")},  # type: ignore[misc]
        {"ingest": ingest},
        publisher=poster,
        ingest_url=f"http://127.0.0.1:{ingest_port}",
        admin_token=token,
        supervisors={"gateway": gateway, "fanout": fanout},
        workers=workers,
        nodes=nodes,
    )
    return running, cluster


# -- what Redis and the kernel see ------------------------------------------------------


def _cli(cluster: EmbeddedCluster, port: int, *command: str, follow: bool = True) -> str:
    """One command through redis-cli (`-c`: following MOVED to the slot's owner); its output."""
    assert cluster.cli is not None
    done = subprocess.run(
        [cluster.cli, *(["-c"] if follow else []), "-p", str(port), *command],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    return done.stdout.strip()


def channel_subscribers(cluster: EmbeddedCluster, feeds: int) -> dict[str, int]:
    """How many connections (one per gateway process with readers) subscribe to each feed's channel.

    PUBSUB SHARDNUMSUB answers for the node asked, without a redirect: every
    node is asked and the counts added (only the slot's owner has any)."""
    out: dict[str, int] = {}
    for i in range(feeds):
        channel = keys.feed_channel(feed_name(i))
        total = 0
        for port in cluster.ports:
            lines = _cli(cluster, port, "PUBSUB", "SHARDNUMSUB", channel, follow=False).splitlines()
            total += int(lines[1]) if len(lines) >= 2 and lines[1].isdigit() else 0
        out[feed_name(i)] = total
    return out


def lease_holders(cluster: EmbeddedCluster, shards: int) -> dict[str, str]:
    """The fan-out worker holding each ingest shard's lease now."""
    return {str(s): _cli(cluster, cluster.ports[0], "GET", keys.fanout_lease(s)) for s in range(shards)}


def redis_memory(cluster: EmbeddedCluster, feeds: int) -> dict[str, Any]:
    """used_memory and keys per node, and the bytes of one feed's history per entry."""
    nodes: dict[str, Any] = {}
    for port in cluster.ports:
        info = _cli(cluster, port, "INFO", "memory")
        used = re.search(r"used_memory:(\d+)", info)
        nodes[str(port)] = {
            "used_memory_mb": round(int(used.group(1)) / 2**20, 2) if used else None,
            "keys": int(_cli(cluster, port, "DBSIZE") or 0),
        }
    feed = feed_name(0)
    port = cluster.ports[0]
    entries = int(_cli(cluster, port, "XLEN", keys.feed_stream(feed)) or 0)
    items = int(_cli(cluster, port, "MEMORY", "USAGE", keys.feed_stream(feed)) or 0)
    index = int(_cli(cluster, port, "MEMORY", "USAGE", keys.feed_index(feed)) or 0)
    history: dict[str, Any] = {"feed": feed, "entries": entries, "items_bytes": items, "index_bytes": index}
    if entries:
        history["bytes_per_entry"] = round((items + index) / entries, 1)
    return {"nodes": nodes, "history": history}


def sockets_of(pid: int) -> int:
    """Open sockets of a process (its accepted WebSockets, plus a few for Redis and listening)."""
    n = 0
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
    return n


# -- the run ------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="streamd-cluster-"))
        print(f"  logs in {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="streamd-cluster-") as tmp:
            yield Path(tmp)


def run(args: argparse.Namespace) -> int:
    started = datetime.datetime.now(datetime.UTC)
    out = args.out or REPO_ROOT / "bench" / "results" / f"cluster-{started:%Y%m%d-%H%M%S}.json"
    pinning = Pinning() if args.no_pin else Pinning.two_cores()
    results: dict[str, Any] = {
        **compare.results_header("cluster", args, started),
        "streamd_source": compare.streamd_source(),
    }
    shape = Shape.even(args.subscribers, args.feeds)
    status = 0
    with terminate_on_sigterm(), _workdir(args.keep_workdir) as workdir, contextlib.ExitStack() as stack:
        try:
            running, cluster = start(args, stack, workdir, pinning)
            print(
                f"cluster: {args.masters} masters x {args.replicas} replicas (ports {cluster.ports}); "
                f"{args.gateways} gateways on :{running.port} (pids {[p.pid for p in running.sut.values()]}); "
                f"{args.fanouts} fan-out workers; {args.ingest_shards} ingest shards",
                flush=True,
            )
            subloads = []
            for k in range(args.subload_procs):
                child = Child(f"subload-{k}", [sys.executable, "-m", "bench.subload"], workdir / f"subload-{k}.log",
                              pinning.rest)  # fmt: skip
                stack.callback(child.stop)
                subloads.append(child)
            ctx = Ctx(args, workdir, pinning, running, subloads)
            results.update(compare.rate_steps(ctx, shape, args.rates))
            results["sockets_per_gateway"] = {n: sockets_of(p.pid) for n, p in running.sut.items()}
            results["channel_subscribers"] = channel_subscribers(cluster, args.feeds)
            results["redis_memory"] = redis_memory(cluster, args.feeds)
            results["fanout_leases"] = lease_holders(cluster, args.ingest_shards)
            running.check_alive(workdir)
            results["server_log_tail"] = compare._log_tail(workdir)
        except BenchError as err:
            print(f"bench cluster: {err}", file=sys.stderr)
            results["error"] = str(err)
            status = 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    if "steps" in results:
        print()
        print(table(results))
    print(f"\nresults: {out}")
    return status


def table(results: dict[str, Any]) -> str:
    """The steps as a Markdown table, and what Redis and the gateways held."""
    head = (
        "| target/s | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | dup | gw us/dlv | gw CPU % "
        "| fanout us/post | redis us/post | ingest us/post | CPU0/CPU1 busy % | other % |"
    )
    rows = [head, "|" + " ---: |" * 15]
    for s in results["steps"]:
        lat = s["latency_ms"]
        per_post = s["us_per_post"]
        fanout = sum(v or 0.0 for k, v in per_post.items() if k.startswith("fanout-"))
        redis = sum(v or 0.0 for k, v in per_post.items() if k.startswith("redis-"))
        cores = s["cpu_pct"]["cores"]
        irq = s["cpu_pct"]["irq"]
        busy = "/".join(f"{cores.get(c, 0) + irq.get(c, 0):.0f}" for c in ("cpu0", "cpu1"))
        other = "/".join(f"{v:.0f}" for v in s["cpu_pct"]["other"].values())
        rows.append(
            f"| {fmt(s['target_deliveries_per_s'])} | {fmt(s['achieved_deliveries_per_s'], 0)} | {fmt(lat['p50'], 2)} "
            f"| {fmt(lat['p99'], 2)} | {fmt(lat['p99.9'], 2)} | {fmt(lat['max'], 1)} | {s['lost']} | {s['dup']} "
            f"| {fmt(s['sut_us_per_delivery'], 1)} | {fmt(s['sut_cpu_pct'], 0)} | {fmt(fanout, 0)} | {fmt(redis, 0)} "
            f"| {fmt(per_post.get('ingest'), 0)} | {busy} | {other} |"
        )
    lines = ["\n".join(rows), ""]
    procs = [(n, v) for n, v in results["steps"][-1]["cpu_pct"]["procs"].items()]
    lines.append("CPU % of one core per process at the last rate: " + ", ".join(f"{n} {v}" for n, v in procs))
    lines.append(f"sockets per gateway process: {results.get('sockets_per_gateway')}")
    lines.append(f"subscribers per feed channel (PUBSUB SHARDNUMSUB): {results.get('channel_subscribers')}")
    mem = results.get("redis_memory", {})
    lines.append(f"fan-out lease holders by ingest shard: {results.get('fanout_leases')}")
    lines.append(f"redis per node: {mem.get('nodes')}")
    lines.append(f"history: {mem.get('history')}")
    return "\n".join(lines)
