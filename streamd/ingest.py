"""Accepting a post (`POST /v1/posts`): the hot path of the HTTP API.

A post needs three things from Redis, in this order: its token checked and
counted against the per-minute budget (`token_use.lua`, the token's slot),
the lists its author is in now (SMEMBERS in the `{m}` slot: the post reaches
the lists its author is in when accepted), and its acceptance
(`ingest_post.lua`: idempotency key, post record and ingest stream entry, in
the ingest shard's slot; on a single server `ingest_fanout.lua`, which also
writes the post to its feeds and publishes it).

On one Redis server the commands go through the process's `AutoPipeline`:
those of every concurrent request leave in one write per loop turn. The
author of a token seen before is known (`Auth.known`), so the token check and
the SMEMBERS leave together; the check still decides (a revoked token is
refused at once) and a hint that turns out wrong only costs a second read.
Under Cluster, or when accepting must WAIT for replicas, the redis-py client
does the same steps one by one.
"""

from __future__ import annotations

import asyncio
import functools
import random
import secrets
from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from streamd import keys
from streamd.auth import USER_TOKEN_PREFIX, Auth
from streamd.autopipe import AutoPipeline
from streamd.errors import Unavailable
from streamd.feeds import expand
from streamd.http_base import read_json
from streamd.lists import Lists, sorted_members
from streamd.metrics import Metrics
from streamd.posts import NewPost, build_post, ingest_shard, validate_new_post
from streamd.settings import Settings
from streamd.store import AnyPipeline, AnyRedis, Replicas, Scripts, is_cluster

# The accepting script's answer when the lists it was given are not the author's now.
STALE_LISTS = -1
# Tries with the lists the script answered before giving up (503): memberships
# that change between every two round trips.
LISTS_ATTEMPTS = 3
LISTS_SEEN = 65_536  # authors whose last lists are remembered (`lists_seen`)


class Acceptance:
    """The last step of accepting a post, shared by `POST /v1/posts` (`Ingest`)
    and the backend `Publisher`: its author known and allowed, its body
    valid and its lists read, `ingest_post.lua` keeps it (`ingest_fanout.lua`
    on a single server, which also writes it to its feeds)."""

    def __init__(self, client: AnyRedis, scripts: Scripts, settings: Settings, fast: AutoPipeline | None) -> None:
        self._redis = client
        self._settings = settings
        # WAIT counts the writes of its own connection: with wait_replicas the
        # script and its WAIT go down one redis-py pipeline of their own.
        self.fast = fast if not settings.wait_replicas else None
        # One server: the accepting script also fans the post out (the feeds'
        # keys are in other slots than the ingest shard's under Cluster).
        self._direct = settings.fanout_at_accept and not is_cluster(client)
        self._script = scripts.ingest_fanout if self._direct else scripts.ingest_post
        self._scripts = scripts
        self._random = random.Random(secrets.randbits(64))  # epochs: unique, not secret
        self._lists_seen: dict[str, list[str]] = {}

    def lists_seen(self, author: str) -> list[str] | None:
        """The author's lists at their last post here, remembered only where the
        accepting script checks the lists it is given against the author's
        lists now (one server): good enough to pass to `store`, no fresh read."""
        return self._lists_seen.get(author)

    async def store(self, author: str, new: NewPost, lists: list[str]) -> tuple[dict[str, Any], bool]:
        """The post kept, and whether it is new (False: an idempotent repeat).
        On one server, lists the author is no longer exactly in are
        refused by the script, which answers with the right ones: it runs
        again with those."""
        for _ in range(LISTS_ATTEMPTS):
            reply = await self._run(author, new, lists)
            if reply[0] != STALE_LISTS:
                break
            lists = sorted_members(reply[1])
        else:
            raise Unavailable("the author's lists kept changing while the post was accepted; try again")
        if self._direct:
            seen = self._lists_seen
            if len(seen) >= LISTS_SEEN and author not in seen:
                seen.clear()
            seen[author] = lists
        created, post_id, body_json = reply
        if created and self.fast is not None:
            # The body stored is the one sent: no need to parse it back.
            post_id = post_id.decode()
            return {
                "id": post_id,
                "author": author,
                "text": new.text,
                "events": new.events,
                "media": new.media,
                "created_at": int(post_id.partition("-")[0]),
            }, True
        return build_post(post_id.decode(), author, body_json), bool(created)

    async def _run(self, author: str, new: NewPost, lists: list[str]) -> Any:
        """The accepting script's reply."""
        script_keys, script_args = self._arguments(author, new, lists)
        scripts = self._scripts
        fast = self.fast
        if fast is not None:
            script = self._script
            return await fast.evalsha(script.sha, script.text, script_keys, script_args)
        if self._settings.wait_replicas:
            # Accepted means on the replicas too: a failover right after the 201
            # cannot lose the post. Else 503, and a retry with the same
            # idempotency key answers with the post if it was kept after all.
            client = self._redis
            wait = await Replicas(client, self._settings).plan([script_keys[0]])

            async def build(pipe: AnyPipeline) -> None:
                await self._script(keys=script_keys, args=script_args, client=pipe)
                wait.queue(pipe)

            reply, *waited = await scripts.run(client, build)
            if isinstance(reply, Exception):
                raise reply
            wait.check(waited)
            return reply
        return await self._script(keys=script_keys, args=script_args)

    def _arguments(self, author: str, new: NewPost, lists: list[str]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of ingest_post.lua, or of ingest_fanout.lua (which adds the feeds')."""
        settings = self._settings
        shard, stream, record_prefix = _author_keys(author, settings.ingest_shards)
        key_digest = new.idempotency_digest()
        feeds = expand(author, new.events, lists)
        script_keys = [stream, keys.idempotency(shard, author, key_digest) if key_digest else stream, record_prefix]
        script_args: list[Any] = [
            author,
            new.body_json(),
            orjson.dumps(lists),
            orjson.dumps(feeds),
            settings.idempotency_ttl_seconds if key_digest else 0,
            settings.post_retention_seconds,
            shard,
            settings.ingest_shards,
        ]
        if self._direct:
            script_keys += (keys.dead_letter_stream(shard), keys.member_of(author))
            script_args += (settings.feed_history_len, self._fresh_epoch())
            _add_feeds(feeds, script_keys, script_args)
        return script_keys, script_args

    def _fresh_epoch(self) -> str:
        """The epoch a fan-out-at-accept script gives a feed that has none yet."""
        return f"{self._random.getrandbits(32):08x}"


    async def delete(self, post_id: str, shard: int, caller: str) -> int:
        """Mark a post deleted; on one server also remove it from its feeds at
        once (`post_delete_fanout.lua`), else the worker does. 1: deleted,
        0: no such post (or deleted already), -1: `caller` ('' for admin) is
        not its author."""
        record, stream = keys.post_record(shard, post_id), keys.ingest_stream(shard)
        if not self._direct:
            result: int = await self._scripts.post_delete(keys=[record, stream], args=[post_id, caller])
            return result
        # A post's feeds are written once, when it is accepted: the script
        # checks them (its keys must be the feeds'), they do not change.
        feeds = await self._redis.hget(record, "f")
        if feeds is None:
            return 0
        script_keys: list[Any] = [record, stream]
        script_args: list[Any] = [post_id, caller, feeds, self._fresh_epoch()]
        _add_feeds(orjson.loads(feeds), script_keys, script_args)
        result = await self._scripts.post_delete_fanout(keys=script_keys, args=script_args)
        if result == -2:  # the record was replaced between the two reads
            raise Unavailable("the post changed while it was being deleted, try again")
        return result


class Ingest:
    """Accepts posts for one app (`INGEST`)."""

    def __init__(
        self,
        client: AnyRedis,
        scripts: Scripts,
        settings: Settings,
        auth: Auth,
        lists: Lists,
        metrics: Metrics,
        fast: AutoPipeline | None,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._lists = lists
        self._accepted = metrics.posts_accepted
        self._acceptance = Acceptance(client, scripts, settings, fast)

    async def delete(self, post_id: str, shard: int, caller: str) -> int:
        """As `Acceptance.delete`."""
        return await self._acceptance.delete(post_id, shard, caller)

    async def accept(self, token: str | None, request: web.Request) -> tuple[dict[str, Any], bool]:
        """The post accepted for the request, and whether it is new (False: an
        idempotent repeat). Errors in the order a client sees them: the token
        (401, 403, 429), then the body (413, 400)."""
        fast_path = (
            self._acceptance.fast is not None
            and token is not None
            and token.startswith(USER_TOKEN_PREFIX)
            and not self._auth.is_admin_token(token)
        )
        if fast_path:
            assert token is not None
            author, new, lists = await self._authorise_auto_pipelined(token, request)
        else:
            author, new, lists = await self._authorise(token, request)
        post, created = await self._acceptance.store(author, new, lists)
        if created:
            self._accepted.inc()
        return post, created

    async def _authorise_auto_pipelined(self, token: str, request: web.Request) -> tuple[str, NewPost, list[str]]:
        """The token check and the memberships of the author it named last time, in one round trip."""
        auth = self._auth
        token_digest = auth.digest_of(token)
        use = auth.use(token_digest, count_post=True)
        hint = auth.known(token_digest)
        hinted = hint.handle if hint is not None else None
        members: Awaitable[Any] | None = self._lists.read_memberships(hinted) if hinted is not None else None
        try:
            who = auth.checked_use(token_digest, await use)
            new = validate_new_post(await read_json(request), self._settings)
        except BaseException:
            _forget(members)
            raise
        author = who.handle
        assert author is not None
        if hinted != author:
            _forget(members)
            members = self._lists.read_memberships(author)
        assert members is not None
        return author, new, sorted_members(await members)

    async def _authorise(self, token: str | None, request: web.Request) -> tuple[str, NewPost, list[str]]:
        """Step by step on the redis-py client (Cluster, wait_replicas, non-user tokens)."""
        who = await self._auth.require_user(token, count_post=True)
        author = who.handle
        assert author is not None
        new = validate_new_post(await read_json(request), self._settings)
        return author, new, await self._lists.memberships(author)


def _add_feeds(feeds: list[str], script_keys: list[Any], script_args: list[Any]) -> None:
    """Each feed's keys and its (channel, name) arguments, as the scripts that
    write feeds at accept take them."""
    for feed in feeds:
        script_keys += keys.feed_keys(feed)
        script_args += (keys.feed_channel(feed), feed)


@functools.lru_cache(maxsize=4096)
def _author_keys(author: str, shards: int) -> tuple[int, str, str]:
    """The author's ingest shard, its stream and its post record prefix."""
    shard = ingest_shard(author, shards)
    return shard, keys.ingest_stream(shard), keys.post_record(shard, "")


def _forget(reply: Awaitable[Any] | None) -> None:
    """A reply no longer wanted: its error, if any, is not reported as unretrieved."""
    if isinstance(reply, asyncio.Future):
        reply.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


INGEST = web.AppKey("ingest", Ingest)
