"""Settings: one frozen dataclass, built once from flags and the environment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # None means "start an embedded server" for `streamd run`.
    redis_url: str | None = None
    data_dir: str = "./streamd-data"
    # None: admin routes answer 401 (a gateway with no admin token configured).
    admin_token: str | None = None
    # Redis Cluster: None asks the node at `redis_url` (which may list several
    # nodes, comma-separated); true or false decides without asking.
    redis_cluster: bool | None = None
    # Processes for `streamd gateway|fanout|run --workers N` (supervisor.py).
    workers: int = 1
    # Also serve GET /metrics and /healthz on this port, plus the worker's
    # index under `--workers N` (one port each), so that `streamd fanout`,
    # which has no other HTTP port, and each gateway worker behind a shared
    # port are scraped apart. 0: off.
    metrics_port: int = 0

    # Protocol limits (the defaults of ../PROTOCOL.md).
    max_text_chars: int = 1000
    max_events: int = 10
    max_media: int = 4
    max_body_bytes: int = 16 * 1024
    max_frame_bytes: int = 4 * 1024
    max_subscriptions: int = 200
    max_backlog: int = 100
    max_malformed_frames: int = 10

    # Rate limits and sizes of the model.
    posts_per_minute: int = 600  # per token
    connections_per_second: float = 20.0  # new sockets per client IP
    connections_burst: int = 50
    frames_per_second: float = 50.0  # client frames per socket; past the burst: close 4029
    frames_burst: int = 200
    # Behind a proxy or load balancer: take the client IP from X-Forwarded-For,
    # the entry `forwarded_for_hops` from its end: each proxy in front of the
    # gateway appends the address it got the request from, so the entries
    # before those are whatever the client sent.
    trust_forwarded_for: bool = False
    forwarded_for_hops: int = 1
    max_lists_per_user: int = 100
    max_list_members: int = 10_000
    max_embed_ttl_seconds: int = 30 * 24 * 3600
    # None: a random secret is kept in Redis and shared by every gateway.
    embed_secret: str | None = None
    post_retention_seconds: int = 30 * 24 * 3600

    # Delivery.
    feed_history_len: int = 10_000
    socket_buffer_bytes: int = 512 * 1024
    replay_page: int = 500
    heartbeat_seconds: float = 25.0
    sse_keepalive_seconds: float = 15.0
    ws_ping_seconds: float = 20.0

    # Ingest.
    ingest_shards: int = 1
    # Durability with replicas: a post is accepted (201), and a fan-out batch
    # acknowledged, only once this many replicas have its writes (Redis WAIT,
    # up to `wait_timeout_ms`); else 503 and the batch is retried. 0: no wait.
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    idempotency_ttl_seconds: int = 24 * 3600

    # Fan-out worker.
    # On a single Redis server, the script that accepts a post also writes it
    # to its feeds and publishes it (ingest_fanout.lua): one hop less for
    # every post; the worker only acknowledges it. Under Cluster, or False:
    # the worker writes the feeds.
    fanout_at_accept: bool = True
    fanout_batch: int = 256
    claim_idle_ms: int = 5_000
    claim_every_seconds: float = 1.0
    redis_pool_size: int = 64

    log_json: bool = False
    # Server processes: a full cycle collection of the whole heap this often,
    # the heap frozen in between (gcpolicy.py); 0: CPython's own schedule.
    gc_full_collect_seconds: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `STREAMD_<FIELD>` variables, then explicit overrides (flags).

        An override of None means "not given" and leaves the lower layers alone.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"STREAMD_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    if kind.startswith("bool"):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw
