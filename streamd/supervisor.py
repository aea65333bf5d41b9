"""Several processes of one command: `streamd gateway|fanout|run --workers N`.

The supervisor runs N workers (the same command with `--workers 1`), each
in its own session so that a Ctrl-C meant for the supervisor reaches the
workers only as the supervisor's SIGTERM, and each dying with it
(PR_SET_PDEATHSIG). A worker that exits while the supervisor is not stopping
is restarted after a back-off (0.5 s, doubling up to 10 s; back to 0.5 s once
a worker has run for a minute). Five failed starts in a row (exiting before
it was ever ready) stop everything with status 1: that is a configuration
error, not a crash. SIGTERM or SIGINT stops every worker with SIGTERM (each
closes its sockets with 1001 and finishes its fan-out batch), then SIGKILL
after `STOP_TIMEOUT`.

Gateways share one port. Where the kernel has SO_REUSEPORT (Linux, the
BSDs, macOS), every worker binds its own listening socket to the port and
the kernel spreads new connections evenly over them; the supervisor keeps a
bound, never-listening socket on the port so that it stays ours across
restarts (and to learn the port when asked for port 0). Without
SO_REUSEPORT, the supervisor listens once and every worker accepts on that
inherited socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("streamd.supervisor")

READY = b"listening on"  # a gateway worker's line when it accepts connections
STOP_TIMEOUT = 20.0
MAX_FAILED_STARTS = 5
_BACKOFF_MIN, _BACKOFF_MAX, _HEALTHY_AFTER = 0.5, 10.0, 60.0


def reuse_port_available() -> bool:
    if not hasattr(socket, "SO_REUSEPORT"):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return True
    except OSError:
        return False


@dataclass(slots=True)
class SharedPort:
    """How the gateway workers share `host:port`: the argv each worker adds, the
    file descriptors it inherits."""

    host: str
    port: int
    sock: socket.socket
    reuse_port: bool

    @classmethod
    def bind(cls, host: str, port: int, *, reuse_port: bool | None = None, backlog: int = 1024) -> SharedPort:
        if reuse_port is None:
            reuse_port = reuse_port_available()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            if not reuse_port:
                sock.listen(backlog)
                sock.set_inheritable(True)
        except BaseException:
            sock.close()
            raise
        return cls(host, sock.getsockname()[1], sock, reuse_port)

    def worker_args(self) -> list[str]:
        if self.reuse_port:
            return ["--host", self.host, "--port", str(self.port), "--reuse-port"]
        return ["--host", self.host, "--port", str(self.port), "--listen-fd", str(self.sock.fileno())]

    def pass_fds(self) -> tuple[int, ...]:
        return () if self.reuse_port else (self.sock.fileno(),)

    def close(self) -> None:
        self.sock.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(slots=True)
class Worker:
    index: int
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False
    failed_starts: int = 0
    backoff: float = _BACKOFF_MIN
    restarts: int = 0
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    """Run `argv` (a `python -m streamd ...` command line) as N workers."""

    def __init__(
        self,
        argv: Sequence[str],
        workers: int,
        *,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        ready_line: bytes | None = READY,
    ) -> None:
        self.workers = [Worker(i, list(argv)) for i in range(workers)]
        self._env = dict(os.environ if env is None else env)
        self._pass_fds = pass_fds
        self._ready_line = ready_line
        self._stopping = False
        self._failed = asyncio.Event()
        # Set once the caller has printed its banner: the workers' own lines
        # (each one's metrics port) come after it, not before.
        self.announced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Future[None]] = set()

    async def wait_ready(self, timeout: float = 60.0) -> bool:
        """Until every worker is ready (printed its ready line, or just started when there is none)."""
        waits = [asyncio.ensure_future(w.ready_event.wait()) for w in self.workers]
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            contenders: list[asyncio.Future[Any]] = [asyncio.gather(*waits), failed]
            done, _ = await asyncio.wait(contenders, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            failed.cancel()
            for w in waits:
                w.cancel()
        return all(w.ready for w in self.workers) and not self._failed.is_set()

    async def run(self, stop: asyncio.Event) -> int:
        """Keep the workers running until `stop`; 1 if they could not be started."""
        self._tasks = [asyncio.create_task(self._keep(w), name=f"streamd-worker-{w.index}") for w in self.workers]
        stopped = asyncio.ensure_future(stop.wait())
        failed = asyncio.ensure_future(self._failed.wait())
        await asyncio.wait([stopped, failed], return_when="FIRST_COMPLETED")
        stopped.cancel()
        failed.cancel()
        await self.stop()
        return 1 if self._failed.is_set() else 0

    async def stop(self) -> None:
        self._stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("supervisor: worker %d (pid %d) did not stop; killing it", w.index, w.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None and w.proc.returncode is None]

    async def _keep(self, w: Worker) -> None:
        while not self._stopping:
            await self._start(w)
            assert w.proc is not None
            status = await w.proc.wait()
            if self._stopping:
                return
            lived = time.monotonic() - w.started
            if not w.ready:
                w.failed_starts += 1
                if w.failed_starts >= MAX_FAILED_STARTS:
                    log.error("supervisor: worker %d failed to start %d times; stopping", w.index, w.failed_starts)
                    self._failed.set()
                    return
            if lived > _HEALTHY_AFTER:
                w.backoff = _BACKOFF_MIN
            log.warning(
                "supervisor: worker %d (pid %d) exited with status %s after %.1fs; restarting in %.1fs",
                w.index, w.proc.pid, status, lived, w.backoff,
            )  # fmt: skip
            await asyncio.sleep(w.backoff)
            w.backoff = min(w.backoff * 2, _BACKOFF_MAX)
            w.restarts += 1

    async def _start(self, w: Worker) -> None:
        env = {**self._env, "STREAMD_WORKER_INDEX": str(w.index)}
        w.ready = False
        w.ready_event.clear()
        w.proc = await asyncio.create_subprocess_exec(
            *w.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            pass_fds=self._pass_fds,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        w.started = time.monotonic()
        if self._ready_line is None:
            self._mark_ready(w)
        reader = asyncio.ensure_future(self._forward(w, w.proc))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)

    def _mark_ready(self, w: Worker) -> None:
        w.ready = True
        w.failed_starts = 0
        w.ready_event.set()

    async def _forward(self, w: Worker, proc: asyncio.subprocess.Process) -> None:
        """See the worker get ready; then copy its stdout to ours, each line
        marked with its index (its start banner is the supervisor's to print)."""
        assert proc.stdout is not None
        out = sys.stdout.buffer
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            if not w.ready:
                if self._ready_line is not None and self._ready_line in line:
                    self._mark_ready(w)
                continue
            if not self.announced.is_set():
                await self.announced.wait()
            out.write(b"[worker %d] " % w.index + line)
            out.flush()
