"""A private Redis Cluster on loopback ports, for the tests and the benchmarks.

`masters` nodes own the 16384 slots (`redis-cli --cluster create`), each with
`replicas` replicas. Every node is an `EmbeddedRedis` with its own directory
(its `nodes.conf` lives there, so a killed node restarted on the same port
rejoins the cluster: a killed master comes back as a replica of the replica
that replaced it). Ports and cluster-bus ports are both picked free on
127.0.0.1, and every node announces 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from streamd.embedded import EmbeddedError, EmbeddedRedis, find_server_binary


def find_cli_binary(server: str | None) -> str | None:
    """The CLI beside `server` (same build), else `redis-cli`/`valkey-cli` from PATH."""
    if server is not None:
        here = Path(server).parent
        for name in ("redis-cli", "valkey-cli"):
            candidate = here / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    for name in ("redis-cli", "valkey-cli"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_pair() -> tuple[int, int]:
    """Two free loopback ports: a node's client port and its cluster-bus port."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return socks[0].getsockname()[1], socks[1].getsockname()[1]
    finally:
        for s in socks:
            s.close()


def _ask(port: int, *command: str, timeout: float = 1.0) -> str:
    """One command to one node over a raw socket (inline protocol); the reply as text."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((" ".join(command) + "\r\n").encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                break
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                if len(rest) >= int(head[1:]) + 2:
                    break
    return data.decode(errors="replace")


class EmbeddedCluster:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        masters: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.binary = binary or find_server_binary()
        self.cli = find_cli_binary(self.binary)
        self.nodes: list[EmbeddedRedis] = []

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port]

    @property
    def url(self) -> str:
        """The URL of one node: streamd discovers the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node_on(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def start(self, timeout: float = 60.0) -> str:
        if self.binary is None or self.cli is None:
            raise EmbeddedError("a Redis Cluster needs redis-server and redis-cli (or valkey-server and valkey-cli)")
        deadline = time.monotonic() + timeout
        try:
            for i in range(self.masters * (1 + self.replicas)):
                self.nodes.append(self._start_node(i))
            self._create(deadline)
            self.wait_healthy(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self.url

    def _start_node(self, index: int) -> EmbeddedRedis:
        for _attempt in range(5):
            port, bus = _free_pair()
            node = EmbeddedRedis(
                self.data_dir / f"node-{index}",
                appendonly=False,
                binary=self.binary,
                port=port,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-announce-ip", "127.0.0.1",
                    "--cluster-port", str(bus),
                    # Any replica may take over, however long its link was down:
                    # the tests kill masters on purpose.
                    "--cluster-replica-validity-factor", "0",
                ),
            )  # fmt: skip
            try:
                node.start()
                return node
            except EmbeddedError:
                continue  # a port was taken meanwhile: pick others
        raise EmbeddedError(f"cluster node {index} did not start; see {self.data_dir / f'node-{index}'}")

    def _create(self, deadline: float) -> None:
        assert self.cli is not None
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        args = [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
        if done.returncode != 0:
            raise EmbeddedError(f"redis-cli --cluster create failed:\n{done.stdout.decode(errors='replace')[-2000:]}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok, they agree on the slots,
        and every replica's link to its master is up (so a failover can happen)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = self._health()
                if not last:
                    return
            except OSError as err:
                last = repr(err)
            time.sleep(0.1)
        raise EmbeddedError(f"cluster not healthy after {timeout:.0f}s: {last}")

    def _health(self) -> str:
        """'' when healthy, else what is not."""
        views = set()
        for node in self.nodes:
            if node.proc is None or node.port is None:
                continue
            info = _ask(node.port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info:
                return f"{node.port}: cluster_state not ok"
            views.add(self._slot_owners(node.port))
            replication = _ask(node.port, "INFO", "replication")
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return f"{node.port}: replica link down"
        if len(views) != 1:
            return "nodes disagree on the slot owners"
        return ""

    def _slot_owners(self, port: int) -> str:
        """The masters with slots, as `port:ranges` lines, sorted: one node's view."""
        lines = []
        for line in _ask(port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) > 8 and "master" in parts[2] and "fail" not in parts[2]:
                lines.append(parts[1].split("@")[0] + " " + " ".join(parts[8:]))
        return "\n".join(sorted(lines))

    def masters_ports(self) -> list[int]:
        """Ports of the masters that own slots now, from a running node's view."""
        for node in self.nodes:
            if node.proc is not None and node.port is not None:
                owners = self._slot_owners(node.port)
                return [int(line.split()[0].rsplit(":", 1)[1]) for line in owners.splitlines()]
        return []

    def replica_of(self, master_port: int) -> int | None:
        """The port of a running replica of the master on `master_port`."""
        for node in self.nodes:
            if node.proc is None or node.port is None or node.port == master_port:
                continue
            info = _ask(node.port, "INFO", "replication")
            if "role:slave" in info and f"master_port:{master_port}\r\n" in info:
                return node.port
        return None

    def owner_of(self, slot: int) -> int:
        """The port of the master serving `slot` (asked of that slot's owner)."""
        for line in _ask(self.ports[0], "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) > 8 and "master" in parts[2] and "fail" not in parts[2]:
                for spec in parts[8:]:
                    if spec.startswith("["):
                        continue  # a slot being migrated or imported
                    low, _, high = spec.partition("-")
                    if int(low) <= slot <= int(high or low):
                        return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        raise EmbeddedError(f"no master serves slot {slot}")

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move one slot and its keys to another master, the way `redis-cli
        --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE every key, then
        SETSLOT NODE on both ends."""
        from_port = self.owner_of(slot)
        if from_port == to_port:
            return
        src = _ask(from_port, "CLUSTER", "MYID").strip().lstrip("$").split("\r\n")[-1]
        dst = _ask(to_port, "CLUSTER", "MYID").strip().lstrip("$").split("\r\n")[-1]
        for port, cmd in ((to_port, "IMPORTING"), (from_port, "MIGRATING")):
            reply = _ask(port, "CLUSTER", "SETSLOT", str(slot), cmd, src if cmd == "IMPORTING" else dst)
            if not reply.startswith("+OK"):
                raise EmbeddedError(f"SETSLOT {cmd} on {port}: {reply}")
        assert self.cli is not None
        while True:
            keys = subprocess.run(
                [self.cli, "-p", str(from_port), "CLUSTER", "GETKEYSINSLOT", str(slot), "100"],
                stdout=subprocess.PIPE, check=True, timeout=10,
            ).stdout.decode().split()  # fmt: skip
            if not keys:
                break
            subprocess.run(
                [self.cli, "-p", str(from_port), "MIGRATE", "127.0.0.1", str(to_port), "", "0", "5000", "KEYS", *keys],
                stdout=subprocess.PIPE, check=True, timeout=10,
            )  # fmt: skip
        for port in (to_port, from_port):
            reply = _ask(port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst)
            if not reply.startswith("+OK"):
                raise EmbeddedError(f"SETSLOT NODE on {port}: {reply}")

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no save): a crashed machine."""
        self.node_on(port).kill()

    def restart(self, port: int) -> None:
        """Start a killed node again on its port and directory: it rejoins the cluster."""
        self.node_on(port).start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(timeout=5)

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
