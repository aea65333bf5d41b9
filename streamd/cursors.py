"""Cursors and the replay-to-live handoff, as pure functions.

A cursor is `<epoch>.<entry id>`: the feed's history epoch (a random tag the
feed gets when its history stream is first written, so a lost and recreated
history is noticed) and the item's entry id in that stream. Clients treat it
as opaque. `0.0-0` is the head of a feed that has no history yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from streamd.errors import BadRequest

EntryId = tuple[int, int]
ZERO: EntryId = (0, 0)
NO_EPOCH = "0"


def parse_entry_id(text: str | bytes) -> EntryId:
    if isinstance(text, bytes):
        text = text.decode()
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_entry_id(entry: EntryId) -> str:
    return f"{entry[0]}-{entry[1]}"


def encode(epoch: str | None, entry_id: str) -> str:
    return f"{epoch or NO_EPOCH}.{entry_id}"


@dataclass(frozen=True, slots=True)
class Cursor:
    epoch: str
    entry: EntryId

    def __str__(self) -> str:
        return encode(self.epoch, format_entry_id(self.entry))


def decode(cursor: object) -> Cursor:
    if not isinstance(cursor, str) or len(cursor) > 80:
        raise BadRequest("cursor must be a string returned by the server")
    epoch, sep, entry = cursor.partition(".")
    ms, dash, seq = entry.partition("-")
    if not (sep and dash and epoch.isalnum() and ms.isdigit() and seq.isdigit()):
        raise BadRequest("malformed cursor: send back a cursor exactly as the server gave it")
    return Cursor(epoch, (int(ms), int(seq)))


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """Where a resume starts reading the history, and whether items were lost."""

    after: EntryId
    gap: bool


def plan_resume(cursor: Cursor, feed_epoch: str | None, trimmed: EntryId) -> ReplayPlan:
    """Decide the replay for a subscribe with `cursor`.

    `feed_epoch` is None when the feed has no history at all; `trimmed` is the
    newest entry id ever trimmed from the history (ZERO if none).
    """
    if feed_epoch is None:
        # Nothing retained. A client that had seen items of an earlier
        # history has lost whatever came after them.
        return ReplayPlan(ZERO, gap=cursor.epoch != NO_EPOCH and cursor.entry != ZERO)
    if cursor.epoch == NO_EPOCH:
        # Subscribed while the feed was empty: everything is after it.
        return ReplayPlan(ZERO, gap=trimmed != ZERO)
    if cursor.epoch != feed_epoch:
        return ReplayPlan(ZERO, gap=True)
    return ReplayPlan(cursor.entry, gap=trimmed > cursor.entry)


@dataclass(slots=True)
class Handoff:
    """Orders items of one feed for one subscriber across replay and live.

    Live items (protocol messages) that arrive while the history is being
    replayed are held here; after the replay, those at or before the last
    replayed entry are dropped.
    """

    last: EntryId = ZERO
    epoch: str | None = None  # of the history replayed (None: it had none)
    held: deque[tuple[EntryId, bytes]] = field(default_factory=deque)
    held_bytes: int = 0  # of the items still held, not of those taken
    peak: int = 0  # the most bytes `hold_within` ever held at once
    dropped: int = 0  # items `hold_within` let go

    def hold(self, entry: EntryId, payload: bytes) -> None:
        self.held.append((entry, payload))
        self.held_bytes += len(payload)

    def hold_within(self, entry: EntryId, payload: bytes, bound: int) -> int:
        """Hold a live item unless that takes the held bytes past `bound`:
        then let go of every held item and this one. The number let go (0:
        held). Only for items that are in the history before they are live:
        the caller reads the ones let go from there, after `last`."""
        size = self.held_bytes + len(payload)
        if size <= bound:
            self.held.append((entry, payload))
            self.held_bytes = size
            self.peak = max(self.peak, size)
            return 0
        n = len(self.held) + 1
        self.dropped += n
        self.held.clear()
        self.held_bytes = 0
        return n

    def replayed(self, entry: EntryId) -> bool:
        """Record a replayed entry; False if it was already delivered."""
        if entry <= self.last:
            return False
        self.last = entry
        return True

    def release(self) -> list[bytes]:
        """The held live messages that come after the replay, in order."""
        return [payload for _, payload in self.take_held()]

    def take_held(self) -> Iterator[tuple[EntryId, bytes]]:
        """The held live items that come after the replay, in order, each
        taken out as it comes. Items held while the caller is between two of
        them come too, so a caller may await in its loop; one that lets items
        go meanwhile (`hold_within`) must stop and read the history first:
        the next held item follows a gap."""
        held = self.held
        while held:
            entry, payload = held.popleft()
            self.held_bytes -= len(payload)
            if entry > self.last:
                self.last = entry
                yield entry, payload
