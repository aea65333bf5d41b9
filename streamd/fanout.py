"""The fan-out worker: ingest stream -> feed histories + live channels.

Reads the ingest stream through the `fanout` consumer group, appends each
post to every feed it reaches and acknowledges the entry only after every
feed is written. History append and live publish are one Lua script call
carrying a whole batch: every post of the batch for every feed of one slot
(all feeds, on a single server). On a single server a batch costs one round
trip on the worker's own auto-pipelined connection (`autopipe.py`): the
acknowledgement of the batches written, the writes of the batch read last,
and the next read; at a few hundred posts a second each Redis wakeup costs
more than the work it does. Under Cluster a batch costs two (the writes, and
one that acknowledges them and reads the next). The script skips a post already in a feed, so an entry redelivered after a
crash never puts a post into a feed twice. Entries left pending by a dead
worker are claimed with XAUTOCLAIM once idle for `claim_idle_ms`.

Any number of workers may run: each shard is read by one of them at a time,
the holder of the shard's lease (`claim_idle_ms` long, renewed between
reads), so one author's posts reach the feeds in the order they were
accepted. Fan-out work spreads over as many workers as there are shards:
the processes register their presence (`LeaseBook`), and one holding more
than its share of the shards (ceil(shards / processes)) gives leases back
for the others to take, so a process started later still gets work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from streamd import keys
from streamd.autopipe import AutoPipeline
from streamd.feeds import expand
from streamd.metrics import Metrics
from streamd.posts import build_post, post_id_for
from streamd.settings import Settings
from streamd.store import TRANSIENT_ERRORS, AnyPipeline, AnyRedis, Replicas, Scripts, Wait, is_cluster

log = logging.getLogger("streamd.fanout")

Entry = tuple[bytes, dict[bytes, bytes]]
# A blocked XREADGROUP whose stream moved away or was deleted; a group that is gone.
LOST_STREAM = ("UNBLOCKED", "NOGROUP")
# (feed, post) items per feed_append call: bounds how long one call holds Redis.
MAX_CALL_ITEMS = 256
# Under steady traffic (batches arriving faster than one post per BUSY_GAP_S)
# the worker waits before its next read, long enough for about LINGER_POSTS
# posts at the rate it sees and never more than LINGER_S, so that a round
# trip carries several posts instead of one: at a thousand posts a second
# that more than halves the worker's CPU per post. Light traffic is read the
# moment it arrives; heavy traffic fills batches without waiting.
LINGER_S = 0.004
LINGER_POSTS = 12
BUSY_GAP_S = 0.005
# A batch whose entries were all fanned out when accepted (ingest_fanout.lua,
# post_delete_fanout.lua: on one server, every post and delete) leaves
# nothing to write: the next read waits this long (at most a third of the
# lease, which is renewed between reads), so that the acknowledgements of a
# steady stream go many at a time instead of one wakeup per post. At 100
# posts a second the worker took 1.1% of a core with 50 ms, 0.4% with 200.
# Only an entry the worker must write (a feed Redis refused, or a post from a
# gateway with `fanout_at_accept` off) waits as long.
ACK_ONLY_LINGER_S = 0.2


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class LeaseBook:
    """The shard leases one fan-out process holds, and its fair share of them.

    Shared by the process's workers (one per shard). Each process keeps an
    entry in `keys.FANOUT_PROCESSES` that expires unless refreshed; the
    number of live entries gives the share, ceil(shards / processes). A
    worker does not take a free lease while its process holds its share,
    and gives one back while its process holds more (after acknowledging
    its batch: the next holder starts by claiming what is pending), so the
    shards spread over the processes whatever order they started in.

    Balance never outranks availability: a lease only counts as held while
    its worker renews it, and a lease left free for a whole lease length is
    taken by any standby, share or not (a worker that hangs must not leave
    its shard unread); the balance is restored by giving back later.
    """

    def __init__(self, client: AnyRedis, shards: int, ttl_ms: int, name: str | None = None) -> None:
        self._redis = client
        self.shards = shards
        self.ttl_ms = ttl_ms
        self.name = name or consumer_name()
        self.share = shards
        self._renewed: dict[int, float] = {}  # shard -> when its worker last renewed the lease
        self._refreshed = 0.0

    @property
    def held(self) -> set[int]:
        horizon = time.monotonic() - self.ttl_ms / 1000
        return {shard for shard, at in self._renewed.items() if at > horizon}

    def renewed(self, shard: int) -> None:
        self._renewed[shard] = time.monotonic()

    def lost(self, shard: int) -> None:
        self._renewed.pop(shard, None)

    async def refresh(self) -> None:
        """Renew this process's presence and recount the processes (at most every ttl/3)."""
        now = time.monotonic()
        if now - self._refreshed < self.ttl_ms / 3000:
            return
        self._refreshed = now
        at = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.FANOUT_PROCESSES, {self.name: at + self.ttl_ms})
            pipe.zremrangebyscore(keys.FANOUT_PROCESSES, "-inf", at)
            pipe.zcard(keys.FANOUT_PROCESSES)
            *_, processes = await pipe.execute()
        self.share = math.ceil(self.shards / max(1, int(processes)))

    def may_take(self, shard: int) -> bool:
        held = self.held
        return shard in held or len(held) < self.share

    def should_give_back(self, shard: int) -> bool:
        # The highest shard goes first, so that one at a time is given back.
        held = self.held
        return len(held) > self.share and shard == max(held)

    async def leave(self) -> None:
        self._refreshed = 0.0
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self._redis.zrem(keys.FANOUT_PROCESSES, self.name)


class FanoutWorker:
    def __init__(
        self,
        client: AnyRedis,
        settings: Settings,
        *,
        consumer: str | None = None,
        shard: int = 0,
        metrics: Metrics | None = None,
        book: LeaseBook | None = None,
    ) -> None:
        self._redis = client
        self.metrics = metrics if metrics is not None else Metrics()
        self._settings = settings
        self._scripts = Scripts.register(client)
        self.consumer = consumer or consumer_name()
        self._shard = shard
        # Alone unless the process shares one between its workers.
        self._book = book if book is not None else LeaseBook(client, 1, max(settings.claim_idle_ms, 100), self.consumer)
        self._stream = keys.ingest_stream(shard)
        self._dead = keys.dead_letter_stream(shard)
        self.processed = 0
        self._replicas = Replicas(client, settings)
        self._cluster = is_cluster(client)
        self._random = random.Random(secrets.randbits(64))  # epochs: unique, not secret; no syscall each
        self._acks: list[bytes] = []  # written, to acknowledge with the next read
        self._unwritten: Batch | None = None  # read, to write with the next round trip (single server)
        self._free_since: float | None = None  # standby: since when the shard's lease is seen free
        # While `run` works: a connection of its own (a blocked read must hold
        # up nothing else) for the reads and writes of the batches, on a single
        # server; None under Cluster or TLS: redis-py.
        self._link: AutoPipeline | None = None

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
        client = self._redis
        self._link = AutoPipeline.for_client(client) if isinstance(client, aioredis.Redis) else None
        try:
            await self._work(stop)
        finally:
            if self._link is not None:
                await self._link.aclose()
                self._link = None
        await self._leave_group()

    async def _work(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        next_claim = 0.0
        ttl = max(self._settings.claim_idle_ms, 100)
        block_ms = max(10, min(500, ttl // 3))  # the lease is renewed between reads
        renewed = 0.0
        last_batch = 0.0
        linger = 0.0
        catch_up = True  # first the entries pending from before (a previous holder, a failed batch)
        while not stop.is_set():
            try:
                await self.ensure_group()
                while not stop.is_set():
                    now = time.monotonic()
                    if now - renewed > ttl / 3000:
                        book = self._book
                        await book.refresh()
                        if book.should_give_back(self._shard):
                            await self._ack()
                            await self._release()
                        if book.may_take(self._shard) or await self._free_for(ttl):
                            held = await self._lease(ttl)
                        else:
                            held = 0
                        if held == 0:
                            book.lost(self._shard)
                            # The batch read but not written is the next holder's:
                            # it stays pending, and is claimed in order with the rest.
                            self._unwritten = None
                            await self._ack()
                            renewed = 0.0
                            await _sleep_unless(stop, block_ms / 1000)
                            continue
                        book.renewed(self._shard)
                        self._free_since = None
                        catch_up = catch_up or held == 1
                        renewed = now
                    if catch_up:
                        await self._ack()
                        await self.claim_stale(min_idle_ms=0)
                        catch_up = False
                    if now >= next_claim:
                        await self._ack()
                        await self.claim_stale()
                        await self.trim_ingest()
                        next_claim = now + self._settings.claim_every_seconds
                    count = await self._read_and_write(block_ms, linger)
                    linger = 0.0
                    if count and self._unwritten is not None and not self._unwritten.calls:
                        linger = min(ACK_ONLY_LINGER_S, block_ms / 1000)
                    elif count:
                        done_at = time.monotonic()
                        gap = done_at - last_batch
                        if count < LINGER_POSTS and gap < count * BUSY_GAP_S:
                            linger = min(LINGER_S, LINGER_POSTS * gap / count)
                        last_batch = done_at
                    backoff = 0.1
                await self._ack()
            except (*TRANSIENT_ERRORS, ResponseError) as err:
                if isinstance(err, ResponseError) and not str(err).startswith(LOST_STREAM):
                    raise
                # LOST_STREAM: the stream left this node (its slot migrated) or
                # was deleted while we were blocked on it: find it again.
                log.warning("fanout: redis unavailable (%s); retrying in %.1fs", err, backoff)
                # Entries written and not acknowledged stay pending: the catch-up
                # claims them, and the scripts skip what is in the feeds already.
                self._acks = []
                self._unwritten = None
                catch_up = True
                renewed = 0.0
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, 5.0) * (0.5 + secrets.randbelow(1000) / 1000)

    async def _release(self) -> None:
        self._book.lost(self._shard)
        await self._scripts.fanout_lease(keys=[keys.fanout_lease(self._shard)], args=[self.consumer, 0])

    async def _free_for(self, ttl_ms: int) -> bool:
        """Whether the shard's lease has been free (no holder) for a whole lease length."""
        if await self._redis.exists(keys.fanout_lease(self._shard)):
            self._free_since = None
            return False
        now = time.monotonic()
        if self._free_since is None:
            self._free_since = now
        return now - self._free_since >= ttl_ms / 1000

    async def _lease(self, ttl_ms: int) -> int:
        """Take or extend this worker's lease on the shard (0: another holds it)."""
        held: int = await self._scripts.fanout_lease(keys=[keys.fanout_lease(self._shard)], args=[self.consumer, ttl_ms])
        return held

    async def step(self, block_ms: int | None = None) -> int:
        """Read, fan out and acknowledge one batch of new entries; returns how many."""
        count = await self._read_and_write(block_ms)
        await self._ack()
        return count

    async def _read_and_write(self, block_ms: int | None, linger: float = 0.0) -> int:
        """Read the next batch; returns how many entries it has.

        On a single server (`_link`) one round trip carries the
        acknowledgement of the entries written so far, the feed writes of the
        batch read last time, and the next read: the batch just read is
        written with the next round trip (or by `_ack`). Under Cluster the
        batch is written at once, and the ack rides with the next read. An
        entry written but not yet acknowledged is only ever redelivered, and a
        redelivered entry writes nothing twice.

        `linger` seconds pass before the read (after the writes): under steady
        traffic a read then carries several posts instead of one."""
        if self._link is not None:
            return await self._write_and_read(self._link, block_ms, linger)
        if linger:
            await asyncio.sleep(linger)
        acks, self._acks = self._acks, []
        batch = self._settings.fanout_batch
        if acks:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xack(self._stream, keys.FANOUT_GROUP, *acks)
            pipe.xreadgroup(keys.FANOUT_GROUP, self.consumer, {self._stream: ">"}, count=batch, block=block_ms)
            reply = (await pipe.execute())[1]
        else:
            reply = await self._redis.xreadgroup(
                keys.FANOUT_GROUP, self.consumer, {self._stream: ">"}, count=batch, block=block_ms
            )
        entries = _entries(reply[0][1]) if reply else []
        if entries:
            self._done(await self.write_feeds(entries))
        return len(entries)

    async def _write_and_read(self, link: AutoPipeline, block_ms: int | None, linger: float) -> int:
        acks, self._acks = self._acks, []
        batch, self._unwritten = self._unwritten, None
        commands = _Commands()
        if acks:
            commands.append(("XACK", self._stream, keys.FANOUT_GROUP, *acks))
        first_write = len(commands)
        if batch is not None:
            self._queue_writes(batch, commands)
        first_read = len(commands)
        futures = [link.execute(*command) for command in commands]
        if linger:
            await asyncio.sleep(linger)  # the writes leave now, the read after
        read: tuple[Any, ...] = ("XREADGROUP", "GROUP", keys.FANOUT_GROUP, self.consumer, "COUNT", self._settings.fanout_batch)
        if block_ms is not None:
            read = (*read, "BLOCK", block_ms)
        futures.append(link.execute(*read, "STREAMS", self._stream, ">"))
        replies = await _replies(futures)
        for r in replies[:first_write]:
            if isinstance(r, Exception):
                raise r
        if batch is not None:
            # The writes are settled before the read's error, if any, is raised.
            results = await self._again_if_scripts_lost(link, batch, replies[first_write:first_read])
            self._done(await self._settle(batch, results))
        reply = replies[-1]
        if isinstance(reply, Exception):
            raise reply
        entries = _entries(reply[0][1]) if reply else []
        if entries:
            self._unwritten = await self._plan_batch(entries)
        return len(entries)

    def _done(self, done: list[bytes]) -> None:
        """Entries whose feeds are written: acknowledged with the next round trip."""
        self._acks.extend(done)
        self.processed += len(done)

    async def _ack(self) -> None:
        """Write the batch read last, if it is not yet, and acknowledge every entry written."""
        batch, self._unwritten = self._unwritten, None
        if batch is not None:
            self._done(await self._write(batch))
        acks, self._acks = self._acks, []
        if not acks:
            return
        if self._link is not None:
            await self._link.execute("XACK", self._stream, keys.FANOUT_GROUP, *acks)
        else:
            await self._redis.xack(self._stream, keys.FANOUT_GROUP, *acks)

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
        """Fan out `entries` and acknowledge them."""
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
        batch = await self._plan_batch(entries)
        return await self._write(batch) if batch is not None else []

    async def _plan_batch(self, entries: Sequence[Entry]) -> Batch | None:
        """The script calls writing `entries` (None: nothing to write);
        an entry that cannot be parsed goes to the dead letters."""
        # A fresh epoch for each batch: a feed whose history was lost gets one its old cursors do not name.
        epoch = f"{self._random.getrandbits(32):08x}"
        plan = Plan(self._scripts, self._settings.feed_history_len, epoch, self._slot_of)
        kept: list[Entry] = []
        fanned_out: list[bytes] = []
        fanned_items = fanned_posts = fanned_post_items = 0
        for raw_id, fields in entries:
            if b"n" in fields:
                # Written to the feeds by the script that accepted it (ingest_fanout.lua,
                # post_delete_fanout.lua): `n` items, for the metrics.
                fanned_out.append(raw_id)
                mark = fields[b"n"]
                items = int(mark) if mark.isdigit() else 1
                fanned_items += items
                if b"x" not in fields:  # a post, not the delete of one
                    fanned_posts += 1
                    fanned_post_items += items
                continue
            try:
                self._plan(plan, len(kept), raw_id, fields)
            except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
                await self._dead_letter(raw_id, fields, f"unparseable ingest entry: {err!r}")
                continue
            kept.append((raw_id, fields))
        calls = plan.finish()
        if not calls and not fanned_out:
            return None
        wait = await self._replicas.plan([call.keys[0] for call in calls])
        return Batch(kept, calls, wait, fanned_out, fanned_items, fanned_posts, fanned_post_items)

    @staticmethod
    def _queue_writes(batch: Batch, pipe: AnyPipeline | _Commands) -> None:
        # EVALSHA queued as it is: a plain pipeline given scripts asks
        # SCRIPT EXISTS first, one more round trip. A missing script
        # (NOSCRIPT) makes `Scripts.run` load them all and run it again.
        for call in batch.calls:
            pipe.execute_command("EVALSHA", call.sha, len(call.keys), *call.keys, *call.args)
        if batch.calls:
            batch.wait.queue(pipe)  # type: ignore[arg-type]

    async def _write(self, batch: Batch) -> list[bytes]:
        if not batch.calls:
            return await self._settle(batch, [])
        if self._link is not None:
            commands = _Commands()
            self._queue_writes(batch, commands)
            results = await self._again_if_scripts_lost(self._link, batch, await _execute(self._link, commands))
        else:

            async def build(pipe: AnyPipeline) -> None:
                self._queue_writes(batch, pipe)

            results = await self._scripts.run(self._redis, build)
        return await self._settle(batch, results)

    async def _again_if_scripts_lost(self, link: AutoPipeline, batch: Batch, results: list[Any]) -> list[Any]:
        """`results`, unless the server lost its scripts (restarted): then they
        are loaded and the batch written again; each script skips what is done
        already."""
        if not any(isinstance(r, NoScriptError) for r in results):
            return results
        await self._scripts.load(self._redis)
        commands = _Commands()
        self._queue_writes(batch, commands)
        return await _execute(link, commands)

    async def _settle(self, batch: Batch, results: list[Any]) -> list[bytes]:
        """The entries of `batch` written, from the replies of its writes;
        refused ones go to the dead letters, a transient error raises."""
        kept, calls, wait = batch.kept, batch.calls, batch.wait
        if calls:
            wait.check(results[len(results) - len(wait) :] if len(wait) else [])
        written: list[list[bytes]] = [[] for _ in kept]
        refused: dict[int, str] = {}
        for call, reply in zip(calls, results, strict=False):
            if isinstance(reply, TRANSIENT_ERRORS) or isinstance(reply, NoScriptError):  # noqa: SIM101
                raise reply  # nothing of this batch is acked: it is all retried
            if isinstance(reply, Exception):
                for owner in call.owners:
                    refused.setdefault(owner, str(reply))
                continue
            for owner, item in zip(call.owners, reply if isinstance(reply, list) else [reply], strict=True):
                if not item:
                    continue  # already in the feed, or deleted
                if item[:1] == b"!":
                    refused.setdefault(owner, item[1:].decode(errors="replace"))
                else:
                    written[owner].append(item)
        done: list[bytes] = []
        for n, (raw_id, fields) in enumerate(kept):
            if n in refused:
                await self._dead_letter(raw_id, fields, f"redis refused its feed writes: {refused[n]}")
            else:
                done.append(raw_id)
        self._count(kept, written, refused)
        if batch.fanned_out:
            # Written by the accepting script itself: no lag between ingest and feed.
            m = self.metrics
            m.posts_fanned_out.inc(batch.fanned_posts)
            m.feed_items_written.inc(batch.fanned_items)
            for _ in range(batch.fanned_post_items):
                m.ingest_lag.observe(0.0)
            done += batch.fanned_out
        return done

    def _count(self, kept: list[Entry], written: list[list[bytes]], refused: dict[int, str]) -> None:
        """Count a batch's feed writes, in bulk. A written item's entry id is
        the time its feed got it, and the ingest entry id the post's created_at."""
        m = self.metrics
        items = posts = 0
        lag = m.ingest_lag
        for n, (raw_id, fields) in enumerate(kept):
            if n in refused:
                continue
            items += len(written[n])
            if b"x" in fields:
                continue  # the delete of a post
            posts += 1
            created = int(raw_id.partition(b"-")[0])
            for entry_id in written[n]:
                lag.observe(max(0, int(entry_id.partition(b"-")[0]) - created) / 1000)
        if items:
            m.feed_items_written.inc(items)
        if posts:
            m.posts_fanned_out.inc(posts)

    def _plan(self, plan: Plan, n: int, raw_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Plan the feed writes of ingest entry number `n`: a post, or the delete of one."""
        if b"x" in fields:
            post_id = fields[b"x"].decode()
            feeds = orjson.loads(fields[b"f"])
            if not isinstance(feeds, list) or not all(isinstance(f, str) for f in feeds):
                raise TypeError("feeds of a delete must be a list of names")
            plan.delete(n, post_id, feeds)
            return
        author = fields[b"a"].decode()
        post_id = post_id_for(raw_id.decode(), self._shard, self._settings.ingest_shards)
        post = build_post(post_id, author, fields[b"d"])
        lists = orjson.loads(fields.get(b"l", b"[]"))
        plan.post(n, post_id, orjson.dumps(post), expand(author, post["events"], lists))

    def _slot_of(self, feed: str) -> int:
        # One script call per slot under Cluster; a single server takes every feed in one.
        return key_slot(keys.feed_stream(feed).encode()) if self._cluster else 0

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
            await self._release()
            if not self._book.held:
                await self._book.leave()
            pending = await self._redis.xpending_range(
                self._stream, keys.FANOUT_GROUP, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self._redis.xgroup_delconsumer(self._stream, keys.FANOUT_GROUP, self.consumer)
        except (*TRANSIENT_ERRORS, ResponseError):
            pass


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can turn a
    # cancellation that meets its timeout into a TimeoutError, and the
    # cancelled worker would go on.
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass


@dataclass(slots=True)
class Batch:
    """The writes of a batch of ingest entries, planned and not yet settled."""

    kept: list[Entry]  # the entries written, in order; `Call.owners` index them
    calls: list[Call]
    wait: Wait
    fanned_out: list[bytes]  # entries fanned out when accepted (posts, deletes): only acknowledged
    fanned_items: int  # the feed items they wrote
    fanned_posts: int  # of those entries, posts
    fanned_post_items: int  # and the feed items of those posts


@dataclass(slots=True)
class Call:
    """One script call of a batch."""

    sha: str
    keys: list[str]
    args: list[Any]
    owners: list[int]  # per reply item: the number of the ingest entry it belongs to


class _Group:
    """Posts of one slot waiting for their feed_append call."""

    __slots__ = ("posts", "numbers", "feeds", "items")

    def __init__(self) -> None:
        self.posts: list[str | bytes] = []  # post id, post JSON, post id, ...
        self.numbers: dict[int, int] = {}  # entry number -> post number in the call (1..)
        self.feeds: dict[str, list[int]] = {}  # feed -> entry numbers, in order
        self.items = 0


class Plan:
    """The script calls of one batch, in an order that keeps every feed's
    items in the order of acceptance: the posts for the feeds of one slot
    share one feed_append call (at most MAX_CALL_ITEMS items), and a delete
    first closes every open call, so it runs after the posts before it and
    before the posts after it."""

    def __init__(self, scripts: Scripts, history_len: int, epoch: str, slot_of: Callable[[str], int]) -> None:
        self._append = scripts.feed_append.sha
        self._delete = scripts.feed_delete.sha
        self._history_len = history_len
        self._epoch = epoch
        self._slot_of = slot_of
        self._groups: dict[int, _Group] = {}
        self.calls: list[Call] = []

    def post(self, n: int, post_id: str, post_json: bytes, feeds: list[str]) -> None:
        for feed in feeds:
            slot = self._slot_of(feed)
            group = self._groups.get(slot)
            if group is None:
                group = self._groups[slot] = _Group()
            if n not in group.numbers:
                group.numbers[n] = len(group.numbers) + 1
                group.posts += (post_id, post_json)
            group.feeds.setdefault(feed, []).append(n)
            group.items += 1
            if group.items >= MAX_CALL_ITEMS:
                self._close(slot)

    def delete(self, n: int, post_id: str, feeds: list[str]) -> None:
        for slot in list(self._groups):
            self._close(slot)
        for feed in feeds:
            self.calls.append(
                Call(
                    self._delete,
                    [*keys.feed_keys(feed)],
                    [keys.feed_channel(feed), feed, post_id, self._epoch],
                    [n],
                )
            )

    def finish(self) -> list[Call]:
        for slot in list(self._groups):
            self._close(slot)
        return self.calls

    def _close(self, slot: int) -> None:
        group = self._groups.pop(slot)
        keys_: list[str] = []
        args: list[Any] = [self._history_len, self._epoch, len(group.numbers), *group.posts]
        owners: list[int] = []
        numbers = group.numbers
        for feed, entries in group.feeds.items():
            keys_ += keys.feed_keys(feed)
            args += (keys.feed_channel(feed), feed, len(entries))
            args += [numbers[n] for n in entries]
            owners += entries
        self.calls.append(Call(self._append, keys_, args, owners))


async def _execute(link: AutoPipeline, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """`commands` in one write (one event-loop turn); their replies in order,
    an error reply as its exception, like `pipeline.execute(raise_on_error=False)`."""
    return await _replies([link.execute(*command) for command in commands])


async def _replies(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    replies: list[Any] = []
    for future in futures:
        try:
            replies.append(await future)
        except RedisError as err:
            replies.append(err)
    return replies


class _Commands(list[tuple[Any, ...]]):
    """Commands queued the way a pipeline queues them, for `_execute`."""

    def execute_command(self, *args: Any, **options: Any) -> None:
        self.append(args)


def _entries(raw: list[Any]) -> list[Entry]:
    """Stream entries from XREADGROUP, parsed by redis-py (field dicts) or raw (field lists)."""
    out: list[Entry] = []
    for entry_id, fields in raw:
        if not isinstance(fields, dict):
            it = iter(fields)
            fields = dict(zip(it, it, strict=True))
        out.append((entry_id, fields))
    return out
