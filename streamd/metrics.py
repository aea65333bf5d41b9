"""Prometheus metrics: every metric streamd exports, in one registry per app.

`GET /metrics` serves them in the Prometheus text format to anyone who asks:
in production serve it only to the scraper (block `/metrics` at the proxy in
front of the gateway, or keep the gateway's port on a private network).

Each app builds one `Metrics` and hands it to its hub and fan-out worker; the
registry is its own, not prometheus_client's global one, so several apps in
one process (the tests) do not collide. Counters on the delivery path are
kept by the hub as plain integers and added to the exported counters when
scraped, never incremented per message or per recipient. Gauges
of what the hub holds are sampled when scraped, so nothing keeps them up to
date on the way.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The classic text format; prometheus_client writes it for our (legacy-valid) names.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: a post normally reaches its feeds and sockets within milliseconds;
# the tail shows a worker backlog or a claim after a crash (claim_idle_ms).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._samplers: list[Callable[[], None]] = []

        # Gateway: what the hub holds (sampled at scrape time by Hub.sample).
        self.connections = Gauge(
            "streamd_connections", "Open reader connections, by kind (ws, sse)", ["kind"], registry=r
        )
        self.subscriptions = Gauge(
            "streamd_subscriptions",
            "Subscriptions, replaying or live: (connection, feed) pairs, by feed kind",
            ["kind"],
            registry=r,
        )
        self.live_feeds = Gauge(
            "streamd_live_feeds", "Feeds this process holds a Redis SUBSCRIBE for (one each, shared)", registry=r
        )

        # Gateway: delivery and closes.
        self.delivered_items = Counter(
            "streamd_delivered_items",
            "Live items queued to readers by the hub, one per reader per item (replayed items not included)",
            registry=r,
        )
        self.delivered_bytes = Counter(
            "streamd_delivered_bytes", "Bytes of those items: WebSocket frames and SSE chunks", registry=r
        )
        self.delivery_latency = Histogram(
            "streamd_delivery_latency_seconds",
            "From a post's created_at (the ms part of its id, read from the live message) to the hub's"
            " first write of the item to local sockets; once per live message per process, not per reader"
            " (Redis's clock against this host's)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slow_closes = Counter(
            "streamd_slow_closes", "Readers closed with 4008 for falling socket_buffer_bytes behind", registry=r
        )
        self.closes = Counter(
            "streamd_closes",
            "Connections the server closed, by close code (closes by clients not included)",
            ["code"],
            registry=r,
        )
        self.replays = Counter("streamd_replays", "Subscribes with a cursor (resumes)", registry=r)
        self.gaps = Counter("streamd_replay_gaps", "Resumes answered with gap: true", registry=r)
        self.live_reconnects = Counter(
            "streamd_live_reconnects", "Connections of the live (pub/sub) Redis connection after a loss", registry=r
        )
        self.refill_dropped = Counter(
            "streamd_refill_dropped_items",
            "Live items a feed refilling after a live reconnect let go at socket_buffer_bytes held,"
            " to read them from its history instead; once per process, not per reader",
            registry=r,
        )
        self.posts_accepted = Counter(
            "streamd_posts_accepted", "Posts accepted by POST /v1/posts (201), idempotent repeats excluded", registry=r
        )

        # Fan-out worker.
        self.posts_fanned_out = Counter(
            "streamd_posts_fanned_out", "Post entries the worker fanned out (deletes excluded; a redelivered one counts again)", registry=r
        )
        self.feed_items_written = Counter(
            "streamd_feed_items_written",
            "Items appended to feed histories and published live, posts and deletes"
            " (a redelivered post already in a feed is not written again)",
            registry=r,
        )
        self.ingest_lag = Histogram(
            "streamd_ingest_lag_seconds",
            "From a post's created_at to its feed entry, per feed item written"
            " (both are Redis stream-id times, so no clock skew; ms resolution)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "streamd_dead_letters", "Ingest entries moved to the dead-letter stream", registry=r
        )
        self.claimed = Counter(
            "streamd_claimed_entries", "Stale ingest entries taken over from another consumer (XAUTOCLAIM)", registry=r
        )
        self.ingest_pending = Gauge(
            "streamd_ingest_pending",
            "Ingest entries delivered to the fanout group and not yet acknowledged, by shard;"
            " sampled by the worker on each claim cycle",
            ["shard"],
            registry=r,
        )

    def on_scrape(self, sample: Callable[[], None]) -> None:
        """Run `sample` before each scrape (to set gauges of current state)."""
        self._samplers.append(sample)

    def render(self) -> bytes:
        for sample in self._samplers:
            sample()
        return generate_latest(self.registry)
