"""The fan-out worker: ingest stream -> feed histories + live channels.

Reads the ingest stream through the `fanout` consumer group, appends each
post to every feed it reaches (history append and live publish are one Lua
script per feed) and acknowledges the entry only after every feed is written.
The script skips a post already in a feed, so an entry redelivered after a
crash never puts a post into a feed twice. Entries left pending by a dead
worker are claimed with XAUTOCLAIM once idle for `claim_idle_ms`.

Any number of workers may run: each shard is read by one of them at a time,
the holder of the shard's lease (`claim_idle_ms` long, renewed between
reads), so one author's posts reach the feeds in the order they were
accepted. Fan-out work spreads over as many workers as there are shards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis.exceptions import NoScriptError, ResponseError

from streamd import keys
from streamd.feeds import expand
from streamd.metrics import Metrics
from streamd.posts import build_post, post_id_for
from streamd.settings import Settings
from streamd.store import TRANSIENT_ERRORS, AnyPipeline, AnyRedis, Replicas, Script, Scripts

log = logging.getLogger("streamd.fanout")

Entry = tuple[bytes, dict[bytes, bytes]]
# A blocked XREADGROUP whose stream moved away or was deleted; a group that is gone.
LOST_STREAM = ("UNBLOCKED", "NOGROUP")
Write = tuple[Script, list[str], list[Any]]  # a script, its keys, its args


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class FanoutWorker:
    def __init__(
        self,
        client: AnyRedis,
        settings: Settings,
        *,
        consumer: str | None = None,
        shard: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self._redis = client
        self.metrics = metrics if metrics is not None else Metrics()
        self._settings = settings
        self._scripts = Scripts.register(client)
        self.consumer = consumer or consumer_name()
        self._shard = shard
        self._stream = keys.ingest_stream(shard)
        self._dead = keys.dead_letter_stream(shard)
        self.processed = 0
        self._replicas = Replicas(client, settings)

    async def ensure_group(self) -> None:
        try:
            # From the start of the stream: posts accepted before any worker ran count too.
            await self._redis.xgroup_create(self._stream, keys.FANOUT_GROUP, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; the batch in flight is finished first.

        Only the holder of the shard's lease reads it, so that the posts of one
        author (one shard) are fanned out one batch after the other, in order;
        other workers wait as standbys and take the lease when it expires.
        """
        backoff = 0.1
        next_claim = 0.0
        ttl = max(self._settings.claim_idle_ms, 100)
        block_ms = max(10, min(500, ttl // 3))  # the lease is renewed between reads
        renewed = 0.0
        catch_up = True  # first the entries pending from before (a previous holder, a failed batch)
        while not stop.is_set():
            try:
                await self.ensure_group()
                while not stop.is_set():
                    now = time.monotonic()
                    if now - renewed > ttl / 3000:
                        held = await self._lease(ttl)
                        if held == 0:
                            renewed = 0.0
                            await _sleep_unless(stop, block_ms / 1000)
                            continue
                        catch_up = catch_up or held == 1
                        renewed = now
                    if catch_up:
                        await self.claim_stale(min_idle_ms=0)
                        catch_up = False
                    if now >= next_claim:
                        await self.claim_stale()
                        await self.trim_ingest()
                        next_claim = now + self._settings.claim_every_seconds
                    await self.step(block_ms=block_ms)
                    backoff = 0.1
            except (*TRANSIENT_ERRORS, ResponseError) as err:
                if isinstance(err, ResponseError) and not str(err).startswith(LOST_STREAM):
                    raise
                # LOST_STREAM: the stream left this node (its slot migrated) or
                # was deleted while we were blocked on it: find it again.
                log.warning("fanout: redis unavailable (%s); retrying in %.1fs", err, backoff)
                catch_up = True
                renewed = 0.0
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, 5.0) * (0.5 + secrets.randbelow(1000) / 1000)
        await self._leave_group()

    async def _lease(self, ttl_ms: int) -> int:
        """Take or extend this worker's lease on the shard (0: another holds it)."""
        held: int = await self._scripts.fanout_lease(keys=[keys.fanout_lease(self._shard)], args=[self.consumer, ttl_ms])
        return held

    async def step(self, block_ms: int | None = None) -> int:
        """Read and fan out one batch of new entries; returns how many."""
        reply = await self._redis.xreadgroup(
            keys.FANOUT_GROUP,
            self.consumer,
            {self._stream: ">"},
            count=self._settings.fanout_batch,
            block=block_ms,
        )
        entries: list[Entry] = reply[0][1] if reply else []
        if entries:
            await self.process(entries)
        return len(entries)

    async def claim_stale(self, min_idle_ms: int | None = None) -> int:
        """Take over entries another consumer left pending for too long
        (`claim_idle_ms`, or `min_idle_ms`: 0 takes every pending entry)."""
        start = "0-0"
        claimed = 0
        while True:
            next_start, entries, *_ = await self._redis.xautoclaim(
                self._stream,
                keys.FANOUT_GROUP,
                self.consumer,
                min_idle_time=self._settings.claim_idle_ms if min_idle_ms is None else min_idle_ms,
                start_id=start,
                count=self._settings.fanout_batch,
            )
            live = [e for e in entries if e[1] is not None]
            if live:
                log.info("fanout: claimed %d stale entries", len(live))
                await self.process(live)
                claimed += len(live)
                self.metrics.claimed.inc(len(live))
            start = next_start.decode() if isinstance(next_start, bytes) else next_start
            if start == "0-0":
                return claimed

    async def process(self, entries: Sequence[Entry]) -> None:
        done = await self.write_feeds(entries)
        if done:
            await self._redis.xack(self._stream, keys.FANOUT_GROUP, *done)
            self.processed += len(done)

    async def write_feeds(self, entries: Sequence[Entry]) -> list[bytes]:
        """Append each entry's post to all its feeds (one pipeline); the ids to ack.

        A lost connection raises, and the entries stay pending to be retried
        (by this worker's next claim or another's); a worker that dies after
        this and before the ack leaves them pending in the same way. So does a
        cluster in the middle of a failover or a migration, and, with
        `wait_replicas`, writes that too few replicas confirmed in time. An
        entry that Redis itself refuses (a script error: the entry is
        malformed) would fail forever, so it goes to the dead letters instead.
        """
        epoch = secrets.token_hex(4)
        planned: list[tuple[bytes, dict[bytes, bytes], list[Write]]] = []
        for raw_id, fields in entries:
            try:
                writes = self._plan(raw_id.decode(), fields, epoch)
            except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
                await self._dead_letter(raw_id, fields, f"unparseable ingest entry: {err!r}")
                continue
            planned.append((raw_id, fields, writes))
        if not planned:
            return []
        written = [keys_[0] for _, _, writes in planned for _, keys_, _ in writes]
        wait = await self._replicas.plan(written)

        async def build(pipe: AnyPipeline) -> None:
            for _, _, writes in planned:
                for script, keys_, args in writes:
                    await script(keys=keys_, args=args, client=pipe)
            wait.queue(pipe)

        results = await self._scripts.run(self._redis, build)
        wait.check(results[len(results) - len(wait) :] if len(wait) else [])
        replies_of = iter(results)
        done: list[bytes] = []
        refused: list[tuple[bytes, dict[bytes, bytes], ResponseError]] = []
        for raw_id, fields, writes in planned:
            replies = [next(replies_of) for _ in writes]
            errors = [r for r in replies if isinstance(r, Exception)]
            transient = [e for e in errors if isinstance(e, (*TRANSIENT_ERRORS, NoScriptError))]
            if transient:
                raise transient[0]  # nothing of this batch is acked: it is all retried
            if errors:
                refused.append((raw_id, fields, errors[0]))
            else:
                done.append(raw_id)
                self._count(raw_id, fields, replies)
        for raw_id, fields, err in refused:
            await self._dead_letter(raw_id, fields, f"redis refused its feed writes: {err}")
        return done

    def _count(self, raw_id: bytes, fields: dict[bytes, bytes], replies: list[Any]) -> None:
        """Count one entry's feed writes. A written item's entry id is the time
        its feed got it, and the ingest entry id the post's created_at."""
        m = self.metrics
        written = [r for r in replies if r is not None]  # None: already in the feed, or deleted
        m.feed_items_written.inc(len(written))
        if b"x" in fields:
            return  # the delete of a post
        m.posts_fanned_out.inc()
        created = int(raw_id.partition(b"-")[0])
        for entry_id in written:
            m.ingest_lag.observe(max(0, int(entry_id.partition(b"-")[0]) - created) / 1000)

    def _plan(self, entry_id: str, fields: dict[bytes, bytes], epoch: str) -> list[Write]:
        """The feed writes of one ingest entry: a post, or the delete of one."""
        if b"x" in fields:
            post_id = fields[b"x"].decode()
            feeds = orjson.loads(fields[b"f"])
            if not isinstance(feeds, list):
                raise TypeError("feeds of a delete must be a list")
            return [
                (
                    self._scripts.feed_delete,
                    [keys.feed_stream(feed), keys.feed_meta(feed), keys.feed_index(feed)],
                    [keys.feed_channel(feed), feed, post_id, epoch],
                )
                for feed in feeds
            ]
        author = fields[b"a"].decode()
        post_id = post_id_for(entry_id, self._shard, self._settings.ingest_shards)
        post = build_post(post_id, author, fields[b"d"])
        lists = orjson.loads(fields.get(b"l", b"[]"))
        post_json = orjson.dumps(post)
        return [
            (
                self._scripts.feed_append,
                [keys.feed_stream(feed), keys.feed_meta(feed), keys.feed_index(feed)],
                [keys.feed_channel(feed), feed, post_id, post_json, self._settings.feed_history_len, epoch],
            )
            for feed in expand(author, post["events"], lists)
        ]

    async def _dead_letter(self, raw_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        record: dict[Any, Any] = {b"entry": raw_id, b"reason": reason.encode(), **fields}
        await self._redis.xadd(self._dead, record, maxlen=10_000, approximate=True)
        await self._redis.xack(self._stream, keys.FANOUT_GROUP, raw_id)
        self.metrics.dead_letters.inc()
        log.error("fanout: moved entry %s to %s: %s", raw_id.decode(), self._dead, reason)

    async def trim_ingest(self) -> None:
        """Drop ingest entries every consumer has finished with; keep the rest."""
        groups = await self._redis.xinfo_groups(self._stream)
        floor: tuple[int, int] | None = None
        for group in groups:
            if group["name"] == keys.FANOUT_GROUP.encode():  # sampled here: the claim cycle asks anyway
                self.metrics.ingest_pending.labels(shard=str(self._shard)).set(group["pending"])
            candidates = [group["last-delivered-id"]]
            if group["pending"]:
                summary = await self._redis.xpending(self._stream, group["name"])
                # None when another worker acked the last pending entry in between.
                candidates.append(summary["min"])
            for c in candidates:
                if c is None:
                    continue
                text = c.decode() if isinstance(c, bytes) else c
                ms, _, seq = text.partition("-")
                value = (int(ms), int(seq or 0))
                floor = value if floor is None or value < floor else floor
        if floor and floor != (0, 0):
            await self._redis.xtrim(self._stream, minid=f"{floor[0]}-{floor[1]}", approximate=False)

    async def _leave_group(self) -> None:
        try:
            await self._scripts.fanout_lease(keys=[keys.fanout_lease(self._shard)], args=[self.consumer, 0])
            pending = await self._redis.xpending_range(
                self._stream, keys.FANOUT_GROUP, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self._redis.xgroup_delconsumer(self._stream, keys.FANOUT_GROUP, self.consumer)
        except (*TRANSIENT_ERRORS, ResponseError):
            pass


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
