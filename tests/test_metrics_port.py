"""`metrics_port`: `/metrics` of `streamd fanout` and of each gateway worker, on ports of their own.

Real processes on the test's Redis: the port is scraped as Prometheus would.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streamd.embedded import free_port
from streamd.posts import ingest_shard
from streamd.settings import Settings
from tests.helpers import ADMIN_TOKEN, Api, WsClient
from tests.process_support import Running, clean_env, running
from tests.test_metrics import scrape, scrape_until

_METRICS_LINE = re.compile(r"Metrics +(http://\S+)/metrics")


def metrics_api(proc: Running, session: aiohttp.ClientSession, prefix: str = "") -> Api:
    """The metrics server a process printed it serves, from its `Metrics` line
    (a supervised worker's: the one the supervisor marked with `prefix`)."""
    found = [m for s in proc.lines if s.startswith(prefix) and (m := _METRICS_LINE.search(s))]
    assert len(found) == 1, proc.lines
    return Api(session, found[0].group(1))


def free_ports(n: int) -> int:
    """The first of `n` consecutive free loopback ports."""
    for _ in range(100):
        base = free_port()
        with contextlib.ExitStack() as held:
            try:
                for i in range(n):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", base + i))
            except OSError:
                continue
            return base
    raise AssertionError(f"no {n} consecutive free ports")


async def test_fanout_serves_the_metrics_of_every_shard(
    redis_url: str, start_server: Callable[..., Any], settings: Settings, session: aiohttp.ClientSession
) -> None:
    shards = 2
    # A gateway that only accepts posts: the feeds are the fan-out process's to write.
    gateway = await start_server(settings.replace(ingest_shards=shards, fanout_at_accept=False), with_worker=False)
    api = Api(session, str(gateway.make_url("")).rstrip("/"))
    handles = [f"author{i}" for i in range(50)]
    authors = [next(h for h in handles if ingest_shard(h, shards) == shard) for shard in range(shards)]
    env = clean_env(
        STREAMD_METRICS_PORT=str(free_port()), STREAMD_FANOUT_AT_ACCEPT="false", STREAMD_INGEST_SHARDS=str(shards)
    )
    async with running(["fanout", "--redis-url", redis_url], env, ready="Metrics") as fanout:
        metrics = metrics_api(fanout, session)
        assert (await scrape(metrics))("streamd_posts_fanned_out_total") == 0
        for handle in authors:
            await api.post(await api.user(handle), f"from {handle}")
        # One post on each shard, each read by its own FanoutWorker: both are counted in the one scrape.
        got = await scrape_until(metrics, "streamd_posts_fanned_out_total", shards)
        assert got("streamd_posts_fanned_out_total") == shards
        assert got("streamd_feed_items_written_total") == shards  # each author's own feed
        assert got("streamd_ingest_lag_seconds_count") == shards
        async with session.get(metrics.base + "/healthz") as resp:
            assert resp.status == 200
        assert await fanout.stop() == 0


async def test_each_gateway_worker_is_scraped_on_its_own_port(redis_url: str, session: aiohttp.ClientSession) -> None:
    port = free_ports(2)
    env = clean_env(STREAMD_METRICS_PORT=str(port), STREAMD_ADMIN_TOKEN=ADMIN_TOKEN)
    args = ["gateway", "--workers", "2", "--port", "0", "--redis-url", redis_url]
    async with running(args, env) as gateway:
        said = [await gateway.wait_line(f"[worker {i}]   Metrics") for i in (0, 1)]
        banner = next(i for i, line in enumerate(gateway.lines) if "  Workers " in line)
        assert all(gateway.lines.index(line) > banner for line in said), gateway.lines  # after the supervisor's banner
        workers = [metrics_api(gateway, session, f"[worker {i}]") for i in (0, 1)]
        assert [w.base for w in workers] == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        # One socket on the shared port reaches one worker: only that one's own registry counts it.
        async with session.ws_connect(gateway.url + "/v1/ws") as ws:
            await WsClient(ws).request("ping")  # answered: the worker's hub holds the socket
            counts = [(await scrape(w))("streamd_connections", kind="ws") for w in workers]
            assert sorted(counts) == [0, 1]
        assert await gateway.stop() == 0


@pytest.mark.parametrize("command", ["run", "gateway", "fanout"])
async def test_a_metrics_port_in_use_fails_the_start(redis_url: str, tmp_path: Path, command: str) -> None:
    extra = {"run": ["--port", "0", "--data-dir", str(tmp_path)], "gateway": ["--port", "0"], "fanout": []}[command]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamd", command, "--redis-url", redis_url, *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=clean_env(STREAMD_METRICS_PORT=str(port)),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    said = err.decode()
    assert proc.returncode == 1, (out, said)
    assert f"streamd {command}: cannot serve /metrics on 127.0.0.1:{port}" in said, said
    assert "Address already in use" in said and "Traceback" not in said, said
    assert b"listening on" not in out and b"fan-out worker" not in out  # never said it was ready


async def test_a_gateway_port_in_use_fails_the_start_with_a_clear_message(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamd", "gateway", "--redis-url", redis_url, "--port", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=clean_env(),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    said = err.decode()
    assert proc.returncode == 1, (out, said)
    assert f"streamd gateway: cannot listen on 127.0.0.1:{port}: Address already in use" in said, said
    assert "Traceback" not in said and b"listening on" not in out, said
