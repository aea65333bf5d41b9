"""Reading a feed's history stream: the head, a backlog, the items after a cursor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamd import cursors, keys
from streamd.autopipe import AutoPipeline
from streamd.cursors import EntryId
from streamd.protocol import delete_frame, post_frame
from streamd.store import AnyRedis, Scripts, StreamEntry, as_entries

RawEntry = StreamEntry


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The feed's epoch (None: no history), newest trimmed id and newest entries."""

    epoch: str | None
    trimmed: EntryId
    newest: list[RawEntry]  # newest first

    @property
    def head(self) -> EntryId:
        return cursors.parse_entry_id(self.newest[0][0]) if self.newest else cursors.ZERO

    @property
    def head_position(self) -> cursors.Cursor:
        return cursors.Cursor(self.epoch or cursors.NO_EPOCH, self.head)

    def head_cursor(self) -> str:
        return str(self.head_position)


class Histories:
    """Reads feed histories for the sockets of one process: through its
    `AutoPipeline` on one Redis server (a reconnect storm is thousands of
    resumes at once: redis-py's pool and per-command cost would queue them),
    else on the redis-py client."""

    __slots__ = ("_client", "_fast", "_script")

    def __init__(self, client: AnyRedis, scripts: Scripts | None = None, fast: AutoPipeline | None = None) -> None:
        self._client = client
        self._fast = fast if scripts is not None else None
        self._script = scripts.feed_snapshot if scripts is not None else None

    async def snapshot(self, feed: str, newest: int) -> Snapshot:
        """As `snapshot`."""
        fast, script = self._fast, self._script
        if fast is None or script is None:
            return await snapshot(self._client, feed, newest)
        (epoch, trimmed), entries = await fast.evalsha(
            script.sha, script.text, (keys.feed_meta(feed), keys.feed_stream(feed)), (max(newest, 1),)
        )
        return _snapshot(epoch, trimmed, _entries(entries))

    async def read_after(self, feed: str, after: EntryId, count: int) -> list[RawEntry]:
        """As `read_after`."""
        if self._fast is None:
            return await read_after(self._client, feed, after, count)
        reply = await self._fast.execute("XRANGE", keys.feed_stream(feed), _after(after), "+", "COUNT", count)
        return _entries(reply)


def _entries(reply: list[list[Any]]) -> list[RawEntry]:
    """Stream entries as hiredis gives them ([id, [field, value, ...]]), shaped as redis-py's."""
    return [(raw_id, dict(zip(fields[::2], fields[1::2], strict=True))) for raw_id, fields in reply]


async def snapshot(client: AnyRedis, feed: str, newest: int) -> Snapshot:
    """Meta and the newest `newest` (>= 1) entries, read atomically (one slot, MULTI)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.hmget(keys.feed_meta(feed), "epoch", "trimmed")
        pipe.xrevrange(keys.feed_stream(feed), count=max(newest, 1))
        (epoch, trimmed), entries = await pipe.execute()
    return _snapshot(epoch, trimmed, entries)


def _snapshot(epoch: bytes | None, trimmed: bytes | None, newest: list[RawEntry]) -> Snapshot:
    """The snapshot of the meta fields `epoch` and `trimmed` as Redis gives them (nil: unset)."""
    return Snapshot(
        epoch=epoch.decode() if epoch else None,
        trimmed=cursors.parse_entry_id(trimmed) if trimmed else cursors.ZERO,
        newest=newest,
    )


async def read_after(client: AnyRedis, feed: str, after: EntryId, count: int) -> list[RawEntry]:
    return as_entries(await client.xrange(keys.feed_stream(feed), min=_after(after), max="+", count=count))


def _after(entry: EntryId) -> str:
    """The XRANGE start just past `entry` (exclusive)."""
    return f"({entry[0]}-{entry[1]}"


def item_frame(feed: str, epoch: str | None, entry: RawEntry) -> bytes:
    """The protocol frame of one history entry."""
    raw_id, fields = entry
    cursor = cursors.encode(epoch, raw_id.decode())
    if fields.get(b"t") == b"delete":
        return delete_frame(feed, cursor, fields[b"pid"].decode())
    return post_frame(feed, cursor, fields[b"p"])
