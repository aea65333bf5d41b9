"""`streamd` as real processes for the tests: started, read until ready, always stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

_URL = re.compile(r"listening on (http://\S+)")
_PIDS = re.compile(r"\(pids ([\d ]+)\)")


@dataclass(slots=True)
class Running:
    proc: asyncio.subprocess.Process
    url: str = ""
    worker_pids: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # stdout, as it comes
    reader: asyncio.Task[None] | None = None

    async def wait_line(self, needle: str, timeout: float = 30) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if needle in line:
                    return line
            seen = len(self.lines)
            if self.proc.returncode is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {needle!r}: {self.lines}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {needle!r} within {timeout}s: {self.lines}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def running(args: list[str], env: dict[str, str], ready: str | None = None) -> AsyncIterator[Running]:
    """`python -m streamd <args>` until the block ends: ready once it printed
    `ready` (default: its `listening on` line, or the supervisor's `Workers` line
    for fan-out workers). Killed if the block did not stop it."""
    if ready is None:
        ready = "Workers" if args[0] == "fanout" else "listening on"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamd", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,  # the servers' logs go to the test's output, shown when it fails
        env=env,
        start_new_session=True,
    )  # fmt: skip
    run = Running(proc)

    async def read() -> None:
        assert proc.stdout is not None
        while line := (await proc.stdout.readline()).decode():
            run.lines.append(line.rstrip("\n"))
            if not run.url and (m := _URL.search(line)):
                run.url = m.group(1)
            if m := _PIDS.search(line):
                run.worker_pids = [int(p) for p in m.group(1).split()]

    run.reader = asyncio.create_task(read())
    try:
        await run.wait_line(ready, 60)
        if "--workers" in args:
            await run.wait_line("Workers", 60)
        yield run
    finally:
        if proc.returncode is None:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await run.stop(30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run.reader, 5)
