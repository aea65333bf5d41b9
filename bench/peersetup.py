"""`python -m bench setup`: install the peers' dependencies, outside the project's environment.

- bench/.venv-peers: a venv with bench/requirements-peers.txt (python-socketio,
  Django Channels, channels_redis, uvicorn, matplotlib for the plots);
- bench/peers/node/node_modules: `npm ci` from package-lock.json.

Both are gitignored (bench/.gitignore). Running it again only adds what is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from bench.engines import BENCH_DIR, NODE_DIR, PEERS_PYTHON, PEERS_VENV

HELP = "install the peers (bench/.venv-peers, npm ci in bench/peers/node)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--python", default=sys.executable, help="interpreter for the venv (default: this one)")


def _run(argv: list[str], cwd: str | None = None, timeout: float = 900) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True, timeout=timeout)


def run(args: argparse.Namespace) -> int:
    try:
        if not PEERS_PYTHON.exists():
            _run([args.python, "-m", "venv", str(PEERS_VENV)])
        _run([str(PEERS_PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q",
              "-r", str(BENCH_DIR / "requirements-peers.txt")])
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            print("bench setup: node and npm are needed for the Node socket.io peer", file=sys.stderr)
            return 1
        _run([npm, "ci", "--no-audit", "--no-fund"], cwd=str(NODE_DIR))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        print(f"bench setup: {err}", file=sys.stderr)
        return 1
    print("bench setup: done")
    return 0
