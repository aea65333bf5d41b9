"""Every Redis key streamd uses, in one place.

Keys that are touched together by one command or script share a hash tag
(the part in braces), so each multi-key operation stays in one Redis Cluster
slot:

    {f:<feed>}          a feed: history stream, meta hash, post index, live channel
    {in:<shard>}        an ingest stream shard, its dead letters, idempotency
                        keys, the records of the posts accepted through it and
                        the lease of the fan-out worker reading it
    {u:<handle>}        a user record, the ids of its tokens, the lists it owns
    {t:<sha256>}        one token, looked up by the hash of its secret, and its rate counter
    {l:<id>}            a list record
    {m}                 every list membership, both directions: one slot so
                        that a member set and the reverse index change together
    {ctl}               process-wide control channel (token revocations)
"""

from __future__ import annotations

PREFIX = "sd"
FANOUT_GROUP = "fanout"


def ingest_stream(shard: int = 0) -> str:
    return f"{PREFIX}:{{in:{shard}}}:posts"


def dead_letter_stream(shard: int = 0) -> str:
    return f"{PREFIX}:{{in:{shard}}}:dead"


def feed_stream(feed: str) -> str:
    """The feed's history: one entry per item, its entry id is the cursor's position."""
    return f"{PREFIX}:{{f:{feed}}}:items"


def feed_meta(feed: str) -> str:
    """Hash with the feed's `epoch` and the last `trimmed` entry id."""
    return f"{PREFIX}:{{f:{feed}}}:meta"


def feed_index(feed: str) -> str:
    """Hash post id -> entry id of the posts currently in the feed's history."""
    return f"{PREFIX}:{{f:{feed}}}:index"


def feed_keys(feed: str) -> tuple[str, str, str]:
    """The keys a feed's scripts take, in their order: history, meta, index."""
    return feed_stream(feed), feed_meta(feed), feed_index(feed)


def feed_channel(feed: str) -> str:
    """Pub/sub channel carrying the feed's live items to the gateways."""
    return f"{PREFIX}:{{f:{feed}}}:live"


CHANNEL_PREFIX = f"{PREFIX}:{{f:"
CHANNEL_SUFFIX = "}:live"


def feed_of_channel(channel: str) -> str:
    return channel[len(CHANNEL_PREFIX) : -len(CHANNEL_SUFFIX)]


def user(handle: str) -> str:
    return f"{PREFIX}:{{u:{handle}}}:user"


def user_tokens(handle: str) -> str:
    """Hash token_id -> sha256 of the token, for listing and revoking."""
    return f"{PREFIX}:{{u:{handle}}}:tokens"


def token(digest: str) -> str:
    return f"{PREFIX}:{{t:{digest}}}:token"


def fanout_lease(shard: int = 0) -> str:
    """The fan-out worker that may read the shard now: one at a time keeps each author's posts in order."""
    return f"{PREFIX}:{{in:{shard}}}:lease"


# Sorted set of the fan-out processes alive (score: when each one's presence
# expires, ms): how many share the ingest shards.
FANOUT_PROCESSES = f"{PREFIX}:{{ctl}}:fanout-processes"


def idempotency(shard: int, author: str, key_digest: str) -> str:
    """Lives beside its ingest shard so the check and the append are one script."""
    return f"{PREFIX}:{{in:{shard}}}:idem:{author}:{key_digest}"


def post_record(shard: int, post_id: str) -> str:
    """Hash: the post JSON, its author, the feeds it reached, `deleted` once deleted."""
    return f"{PREFIX}:{{in:{shard}}}:post:{post_id}"


def post_rate(token_digest: str, window: int) -> str:
    return f"{PREFIX}:{{t:{token_digest}}}:rate:{window}"


def list_record(list_id: str) -> str:
    return f"{PREFIX}:{{l:{list_id}}}:list"


def lists_owned(handle: str) -> str:
    """Sorted set of list ids owned by the user, scored by creation time."""
    return f"{PREFIX}:{{u:{handle}}}:lists"


def list_members(list_id: str) -> str:
    return f"{PREFIX}:{{m}}:members:{list_id}"


def member_of(handle: str) -> str:
    """The reverse index: ids of the lists the user is a member of."""
    return f"{PREFIX}:{{m}}:member-of:{handle}"


CONTROL_CHANNEL = f"{PREFIX}:{{ctl}}:control"
EMBED_SECRET = f"{PREFIX}:{{ctl}}:embed-secret"
