"""The engines `python -m bench compare` runs: how to start each one's server and its publisher.

Every engine gets the same shape on the same machine: a private Redis, the
system under test (SUT) alone on CPU 0, and on CPU 1 Redis, the publisher and
the load generator. The SUT is what holds the WebSockets:

| engine | SUT (CPU 0) | publisher (CPU 1), reaching the SUT only through Redis |
| --- | --- | --- |
| streamd | `streamd gateway` (WebSockets) and `streamd fanout` | `streamd.publisher.Publisher.post` |
| streamd-http | the same | HTTP POST /v1/posts to a second `streamd gateway` (on CPU 1) |
| psio | python-socketio AsyncServer on aiohttp, AsyncRedisManager | AsyncRedisManager(write_only=True).emit |
| channels | Django Channels 4 under uvicorn, channels_redis pub/sub layer | channel_layer.group_send |
| node | Node socket.io 4, @socket.io/redis-streams-adapter | a second socket.io Server on the same adapter |

streamd's fan-out worker is part of its SUT: its CPU is charged per delivery
with the gateway's. Every engine's publisher is its own Redis emitter; streamd
also runs with HTTP posts (`streamd-http`), whose ingest gateway is reported
beside the SUT (a `support` process).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import REPO_ROOT, BenchError, Child, Pinning, _child_setup, _clean_env, stop_process
from streamd.embedded import EmbeddedRedis, free_port

BENCH_DIR = REPO_ROOT / "bench"
PEERS_VENV = BENCH_DIR / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
NODE_DIR = BENCH_DIR / "peers" / "node"

# As in `bench.fanout`: one address opens every socket and a few authors post
# hundreds of times a second, past the abuse limits meant for the internet.
STREAMD_ENV = {
    "STREAMD_POSTS_PER_MINUTE": str(10**9),
    "STREAMD_CONNECTIONS_PER_SECOND": str(10**9),
    "STREAMD_CONNECTIONS_BURST": str(10**9),
}

ENGINES = ("streamd", "psio", "channels", "node")
# streamd with every post an HTTP POST /v1/posts to an ingest gateway on CPU 1.
EXTRA_ENGINES = ("streamd-http",)
DIALECTS = {"streamd": "streamd", "streamd-http": "streamd", "psio": "socketio", "channels": "channels", "node": "socketio"}
LABELS = {
    "streamd": "streamd",
    "streamd-http": "streamd, posts over HTTP (POST /v1/posts to an ingest gateway)",
    "psio": "python-socketio + AsyncRedisManager",
    "channels": "Django Channels + channels_redis (pub/sub)",
    "node": "Node socket.io + redis-streams-adapter",
}


@dataclass(slots=True)
class Running:
    """One engine's processes for one scenario."""

    engine: str
    port: int
    sut: dict[str, subprocess.Popen[bytes]]  # on CPU 0: the CPU we charge per delivery
    support: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # on CPU 1, not the SUT
    redis: EmbeddedRedis | None = None
    publisher: Child | None = None
    ingest_url: str = ""  # streamd: the gateway that takes the posts
    admin_token: str = ""

    def pids(self) -> dict[str, int]:
        out = {f"sut:{n}": p.pid for n, p in self.sut.items()}
        out.update({f"support:{n}": p.pid for n, p in self.support.items()})
        if self.redis is not None and self.redis.proc is not None:
            out["redis"] = self.redis.proc.pid
        if self.publisher is not None:
            out["publisher"] = self.publisher.pid
        return out

    def check_alive(self, workdir: Path) -> None:
        for name, proc in {**self.sut, **self.support}.items():
            if proc.poll() is not None:
                raise BenchError(f"{self.engine} {name} exited with status {proc.returncode}; see {workdir}/{name}.log")


def _spawn(
    stack: contextlib.ExitStack,
    workdir: Path,
    name: str,
    argv: list[str],
    env: dict[str, str],
    cpus: set[int] | None,
    cwd: Path = REPO_ROOT,
) -> subprocess.Popen[bytes]:
    out = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the stack
    stack.callback(out.close)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=_clean_env(env),
        preexec_fn=_child_setup(cpus),
    )
    stack.callback(stop_process, proc)
    return proc


def _wait_port(proc: subprocess.Popen[bytes], name: str, port: int, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not listen on port {port} within {timeout:.0f}s; see {log}")


def peers_ready() -> str | None:
    """Why the peers cannot run, or None."""
    if not PEERS_PYTHON.exists():
        return f"{PEERS_PYTHON} missing: run `python -m bench setup` first"
    if not (NODE_DIR / "node_modules").exists():
        return f"{NODE_DIR}/node_modules missing: run `python -m bench setup` first"
    return None


def start(
    engine: str, stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, publisher_log: Path
) -> Running:
    if pinning.rest is not None:
        # Redis and the publisher inherit this process's CPU mask.
        os.sched_setaffinity(0, pinning.rest)
    redis = EmbeddedRedis(workdir / "redis", appendonly=False)
    stack.callback(redis.stop)
    url = redis.start()
    port = free_port()
    starters: dict[str, Callable[..., Running]] = {
        "streamd": _start_streamd,
        "streamd-http": _start_streamd_http,
        "psio": _start_psio,
        "channels": _start_channels,
        "node": _start_node,
    }
    running = starters[engine](stack, workdir, pinning, url, port, publisher_log)
    running.redis = redis
    return running


def _publisher(stack: contextlib.ExitStack, name: str, argv: list[str], log: Path, pinning: Pinning) -> Child:
    child = Child(name, argv, log, pinning.rest)
    stack.callback(child.stop)  # LIFO: the publisher stops before the servers
    return child


STREAMD = [sys.executable, "-m", "streamd"]


def _streamd_gateway(port: int, url: str) -> list[str]:
    return [*STREAMD, "gateway", "--host", "127.0.0.1", "--port", str(port), "--redis-url", url]


def _start_streamd_sut(
    stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, url: str, port: int
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, str]]:
    """The SUT: `streamd gateway` (WebSockets) and `streamd fanout`, both on CPU 0."""
    token = "bench-" + os.urandom(12).hex()
    env = {**STREAMD_ENV, "STREAMD_ADMIN_TOKEN": token}
    gw = _spawn(stack, workdir, "gateway", _streamd_gateway(port, url), env, pinning.gateway)
    fanout = _spawn(stack, workdir, "fanout", [*STREAMD, "fanout", "--redis-url", url], env, pinning.gateway)
    _wait_port(gw, "gateway", port, workdir / "gateway.log")
    return {"gateway": gw, "fanout": fanout}, env


def _start_streamd(
    stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, url: str, port: int, publisher_log: Path
) -> Running:
    sut, env = _start_streamd_sut(stack, workdir, pinning, url, port)
    pub = _publisher(stack, "publisher", [sys.executable, "-m", "bench.publish", "streamd", "--redis-url", url],
                     publisher_log, pinning)
    # The publisher creates its authors over HTTP on the SUT before the run.
    return Running("streamd", port, sut, publisher=pub, ingest_url=f"http://127.0.0.1:{port}",
                   admin_token=env["STREAMD_ADMIN_TOKEN"])


def _start_streamd_http(
    stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, url: str, port: int, publisher_log: Path
) -> Running:
    sut, env = _start_streamd_sut(stack, workdir, pinning, url, port)
    ingest_port = free_port()
    ingest = _spawn(stack, workdir, "ingest", _streamd_gateway(ingest_port, url), env, pinning.rest)
    _wait_port(ingest, "ingest", ingest_port, workdir / "ingest.log")
    pub = _publisher(stack, "poster", [sys.executable, "-m", "bench.loadgen", "poster"], publisher_log, pinning)
    return Running(
        "streamd-http",
        port,
        sut,
        {"ingest": ingest},
        publisher=pub,
        ingest_url=f"http://127.0.0.1:{ingest_port}",
        admin_token=env["STREAMD_ADMIN_TOKEN"],
    )


def _peers_env(url: str) -> dict[str, str]:
    return {"PYTHONPATH": str(REPO_ROOT), "BENCH_REDIS_URL": url}


def _start_psio(
    stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, url: str, port: int, publisher_log: Path
) -> Running:
    argv = [str(PEERS_PYTHON), "-m", "bench.peers.psio_server", "--redis-url", url, "--port", str(port)]
    return _start_python_peer("psio", argv, stack, workdir, pinning, url, port, publisher_log)


def _start_channels(
    stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, url: str, port: int, publisher_log: Path
) -> Running:
    argv = [
        str(PEERS_PYTHON), "-m", "uvicorn", "bench.peers.channels_app.asgi:application",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--ws", "websockets", "--no-access-log", "--log-level", "warning", "--lifespan", "off",
        "--backlog", "4096",
    ]  # fmt: skip
    return _start_python_peer("channels", argv, stack, workdir, pinning, url, port, publisher_log)


def _start_python_peer(
    engine: str,
    argv: list[str],
    stack: contextlib.ExitStack,
    workdir: Path,
    pinning: Pinning,
    url: str,
    port: int,
    publisher_log: Path,
) -> Running:
    """A Python peer's server on the SUT's core, and its publisher (`bench.publish <engine>`) from the peers' venv."""
    server = _spawn(stack, workdir, "server", argv, _peers_env(url), pinning.gateway)
    _wait_port(server, f"{engine} server", port, workdir / "server.log")
    pub = _publisher(stack, "publisher", [str(PEERS_PYTHON), "-m", "bench.publish", engine, "--redis-url", url],
                     publisher_log, pinning)
    return Running(engine, port, {"server": server}, publisher=pub)


def _start_node(
    stack: contextlib.ExitStack, workdir: Path, pinning: Pinning, url: str, port: int, publisher_log: Path
) -> Running:
    server = _spawn(
        stack, workdir, "server", ["node", "server.js", "--redis-url", url, "--port", str(port)], {}, pinning.gateway,
        cwd=NODE_DIR,
    )
    _wait_port(server, "node server", port, workdir / "server.log")
    pub = _publisher(stack, "publisher", ["node", str(NODE_DIR / "publisher.js"), "--redis-url", url],
                     publisher_log, pinning)
    return Running("node", port, {"server": server}, publisher=pub)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
