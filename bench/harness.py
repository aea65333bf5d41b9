"""Processes of a benchmark run: the system under test, the load generator
children, CPU pinning and CPU accounting from /proc.

Everything started here is stopped by `ExitStack` callbacks on every path
(normal end, exception, Ctrl-C, SIGTERM), and every child also gets SIGTERM
from the kernel if this process dies (PR_SET_PDEATHSIG), so a benchmark never
leaves servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from streamd.embedded import EmbeddedRedis

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(rb"listening on http://([^:\s]+):(\d+)")


class BenchError(RuntimeError):
    pass


# -- CPU pinning and accounting ------------------------------------------------


def can_pin(*cpus: int) -> bool:
    return set(cpus) <= os.sched_getaffinity(0)


def _child_setup(cpus: set[int] | None) -> Callable[[], None]:
    """preexec_fn: pin before exec (so every later thread inherits it) and die with us."""

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def process_ticks(pid: int) -> int:
    """utime + stime of every thread of `pid`, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


@dataclass(frozen=True, slots=True)
class CoreTicks:
    """One CPU's clock ticks since boot, from /proc/stat."""

    busy: int  # user nice system: what processes ran
    irq: int  # irq softirq: not charged to any process (much of the loopback network path)
    steal: int  # taken by the hypervisor: neither ours nor idle, a sign of a noisy host
    total: int


def cpu_ticks() -> dict[str, CoreTicks]:
    """Per CPU (`cpu0`, `cpu1`...)."""
    out: dict[str, CoreTicks] = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"cpu") and line[3:4].isdigit():
                name, *values = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
                busy = user + nice + system
                out[name.decode()] = CoreTicks(busy, irq + softirq, steal, busy + irq + softirq + steal + idle + iowait)
    return out


@dataclass(slots=True)
class CpuSnapshot:
    at_ns: int
    procs: dict[str, int]
    cores: dict[str, CoreTicks]


def snapshot(pids: Mapping[str, int]) -> CpuSnapshot:
    procs: dict[str, int] = {}
    for name, pid in pids.items():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            procs[name] = process_ticks(pid)
    return CpuSnapshot(time.monotonic_ns(), procs, cpu_ticks())


# -- children ------------------------------------------------------------------------


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment without STREAMD_* variables of the caller: only the flags count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMD_")}
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Child:
    """A load generator child speaking JSON lines: a command on its stdin, the reply on its stdout."""

    def __init__(self, name: str, argv: list[str], log: Path, cpus: set[int] | None) -> None:
        self.name = name
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=REPO_ROOT,
            env=_clean_env({}),
            preexec_fn=_child_setup(cpus),
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: str, **fields: Any) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(orjson.dumps({"cmd": cmd, **fields}) + b"\n")
            stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{self.name} exited (status {self.proc.poll()}); see {self._log.name}") from None

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next reply line; BenchError if it does not come within `timeout` or says ok=false."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name} did not answer within {timeout:.0f}s")
                if not sel.select(left):
                    continue
                chunk = os.read(stdout.fileno(), 1 << 20)
                if not chunk:
                    raise BenchError(f"{self.name} exited (status {self.proc.poll()}); see {self._log.name}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, Any] = orjson.loads(line)
        if not reply.get("ok"):
            raise BenchError(f"{self.name}: {reply.get('error', reply)}")
        return reply

    def request(self, cmd: str, timeout: float, **fields: Any) -> dict[str, Any]:
        self.send(cmd, **fields)
        return self.receive(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        # EOF on stdin is the child's signal to close its sockets and exit.
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout=2.0)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


# -- the system under test -------------------------------------------------------


@dataclass(slots=True)
class Pinning:
    """Which CPUs the gateway and everything else (Redis, fan-out, load generator) run on."""

    gateway: set[int] | None = None
    rest: set[int] | None = None

    @classmethod
    def two_cores(cls) -> Pinning:
        if not can_pin(0, 1):
            print("bench: CPUs 0 and 1 are not both available; running unpinned", file=sys.stderr)
            return cls()
        return cls(gateway={0}, rest={1})


@dataclass(slots=True)
class ServerUnderTest:
    """A private Redis, `streamd fanout` and `streamd gateway`, all on this machine."""

    workdir: Path
    pinning: Pinning
    env: dict[str, str] = field(default_factory=dict)  # STREAMD_* settings for both servers
    with_fanout: bool = True  # False: the gateway alone (what ingest measures)
    admin_token: str = field(default_factory=lambda: "bench-" + secrets.token_urlsafe(24))
    redis: EmbeddedRedis | None = None
    gateway: subprocess.Popen[bytes] | None = None
    fanout: subprocess.Popen[bytes] | None = None
    base_url: str = ""
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, stack: contextlib.ExitStack, timeout: float = 20.0) -> None:
        if self.pinning.rest is not None:
            # This process belongs with the load generator; Redis and the
            # fan-out worker inherit the mask from it.
            os.sched_setaffinity(0, self.pinning.rest)
        self.redis = EmbeddedRedis(self.workdir / "redis", appendonly=False)
        stack.callback(self.redis.stop)
        redis_url = self.redis.start()

        if self.with_fanout:
            self.fanout = self._spawn("fanout", ["fanout", "--redis-url", redis_url], self.env, self.pinning.rest)
            stack.callback(stop_process, self.fanout)
        self.gateway = self._spawn(
            "gateway",
            ["gateway", "--host", "127.0.0.1", "--port", "0", "--redis-url", redis_url],
            {**self.env, "STREAMD_ADMIN_TOKEN": self.admin_token},
            self.pinning.gateway,
        )
        stack.callback(stop_process, self.gateway)
        stack.callback(self._close_logs)

        deadline = time.monotonic() + timeout
        port = self._wait_for("gateway", self.gateway, _LISTENING, deadline)
        self.base_url = f"http://127.0.0.1:{int(port.group(2))}"
        if self.fanout is not None:
            self._wait_for("fanout", self.fanout, re.compile(rb"fan-out worker"), deadline)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], cpus: set[int] | None) -> subprocess.Popen[bytes]:
        # Logs go to files, never to our terminal: at INFO streamd only logs
        # rare events, and the WARNING/ERROR lines are reported at the end.
        out = open(self.workdir / f"{name}.out", "wb")  # noqa: SIM115 - closed by _close_logs
        err = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        self._logs += [out, err]
        return subprocess.Popen(
            [sys.executable, "-m", "streamd", *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=self.workdir,
            env=_clean_env(env),
            preexec_fn=_child_setup(cpus),
        )

    def _wait_for(
        self, name: str, proc: subprocess.Popen[bytes], pattern: re.Pattern[bytes], deadline: float
    ) -> re.Match[bytes]:
        path = self.workdir / f"{name}.out"
        while time.monotonic() < deadline:
            found = pattern.search(path.read_bytes())
            if found:
                return found
            if proc.poll() is not None:
                tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise BenchError(f"{name} exited with status {proc.returncode}:\n{tail}")
            time.sleep(0.05)
        raise BenchError(f"{name} did not start in time; see {path}")

    def _close_logs(self) -> None:
        for f in self._logs:
            f.close()

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, proc in (("gateway", self.gateway), ("fanout", self.fanout)):
            if proc is not None:
                out[name] = proc.pid
        if self.redis is not None and self.redis.proc is not None:
            out["redis"] = self.redis.proc.pid
        return out

    def check_alive(self) -> None:
        for name, proc in (("gateway", self.gateway), ("fanout", self.fanout)):
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}; see {self.workdir / (name + '.log')}")

    def log_issues(self, limit: int = 20) -> dict[str, list[str]]:
        """WARNING and worse lines of each server's log (tracebacks included)."""
        out: dict[str, list[str]] = {}
        for name in ("gateway", "fanout"):
            path = self.workdir / f"{name}.log"
            if not path.exists():
                continue
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            bad = [ln for ln in lines if not re.search(r"\bINFO\b", ln)]
            if bad:
                out[name] = bad[:limit] + ([f"... {len(bad) - limit} more lines"] if len(bad) > limit else [])
        return out


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so that every `finally` and ExitStack runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
