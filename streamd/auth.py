"""Who is calling: the admin token, user tokens and signed embed tokens.

User tokens are random and stored only as their SHA-256; a token record names
its user and its token id (the handle used to revoke it). Embed tokens are
HMAC-signed, carry one feed and an expiry, and are read-only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import orjson

from streamd import keys, store
from streamd.autopipe import AutoPipeline
from streamd.errors import BadRequest, Conflict, Forbidden, NotFound, RateLimited, Unauthorized
from streamd.feeds import valid_handle
from streamd.store import AnyRedis, Scripts

USER_TOKEN_PREFIX = "sdu_"
EMBED_TOKEN_PREFIX = "sde_"
MAX_DISPLAY_NAME_CHARS = 64
# Token digest -> principal, for the tokens seen lately. Only a hint: every use
# of a token is still checked in Redis (and counted), so a revoked token is
# refused at once by every gateway; the hint lets a post read its author's
# lists in the same round trip as that check.
MAX_KNOWN_TOKENS = 50_000


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "admin", "user" or "embed"
    handle: str | None = None  # user: the user; embed: who issued it
    token_id: str | None = None  # user tokens only
    feed: str | None = None  # embed tokens only: the one feed they may read
    expires_at: float | None = None  # embed tokens only (Unix seconds)

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


ADMIN = Principal("admin")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return value.strip()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_embed_token(secret: bytes, feed: str, issuer: str, expires_at: int) -> str:
    payload = _b64(orjson.dumps({"f": feed, "i": issuer, "e": expires_at, "n": secrets.token_hex(4)}))
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
    return f"{EMBED_TOKEN_PREFIX}{payload}.{_b64(mac)}"


def verify_embed_token(secret: bytes, token: str, now: float) -> Principal | None:
    """The embed principal of a well-signed, unexpired token; None otherwise."""
    body = token[len(EMBED_TOKEN_PREFIX) :]
    payload, _, mac = body.partition(".")
    try:
        expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            return None
        claims = orjson.loads(_unb64(payload))
        feed, issuer, expires_at = claims["f"], claims["i"], claims["e"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(expires_at, int) or expires_at <= now:
        return None
    return Principal("embed", handle=issuer, feed=feed, expires_at=float(expires_at))


class Auth:
    def __init__(
        self,
        client: AnyRedis,
        scripts: Scripts,
        admin_token: str | None,
        posts_per_minute: int,
        embed_secret: str | None = None,
        fast: AutoPipeline | None = None,
    ) -> None:
        self._redis = client
        self._fast = fast
        self._known: dict[str, Principal] = {}
        self._digests: dict[str, str] = {}
        self._scripts = scripts
        self._admin_token = admin_token
        self._posts_per_minute = posts_per_minute
        self._configured_secret = embed_secret
        self._embed_secret: bytes | None = None

    async def embed_secret(self) -> bytes:
        """The configured secret, else one kept in Redis (the first gateway makes
        it, every gateway shares it). Loaded on first use, so a gateway that
        started while Redis was down still gets it."""
        if self._embed_secret is None:
            if self._configured_secret:
                self._embed_secret = self._configured_secret.encode()
            else:
                await self._redis.set(keys.EMBED_SECRET, secrets.token_hex(32), nx=True)
                self._embed_secret = store.as_bytes(await self._redis.get(keys.EMBED_SECRET))
        assert self._embed_secret is not None
        return self._embed_secret

    async def issue_embed_token(self, feed: str, issuer: str, ttl_seconds: int) -> tuple[str, int]:
        expires_at = int(time.time()) + ttl_seconds
        return sign_embed_token(await self.embed_secret(), feed, issuer, expires_at), expires_at

    async def principal(self, token: str | None, *, count_post: bool = False) -> Principal | None:
        """The caller for a token; None when no token was given; Unauthorized if unknown.

        With `count_post`, a user token's use counts against its posts-per-minute
        budget, and RateLimited is raised past it.
        """
        if token is None:
            return None
        if self.is_admin_token(token):
            return ADMIN
        if token.startswith(USER_TOKEN_PREFIX):
            token_digest = self.digest_of(token)
            return self.checked_use(token_digest, await self.use(token_digest, count_post=count_post))
        if token.startswith(EMBED_TOKEN_PREFIX):
            embed = verify_embed_token(await self.embed_secret(), token, time.time())
            if embed is not None:
                return embed
        raise Unauthorized("unknown, revoked or expired token")

    def digest_of(self, token: str) -> str:
        """`digest(token)`, remembered for the tokens seen lately (hashing is a
        measurable part of accepting a post)."""
        found = self._digests.get(token)
        if found is None:
            found = digest(token)
            if len(self._digests) >= MAX_KNOWN_TOKENS:
                self._digests.clear()
            self._digests[token] = found
        return found

    def is_admin_token(self, token: str) -> bool:
        admin = self._admin_token
        if not admin:
            return False
        return hmac.compare_digest(token.encode(), admin.encode())

    def use(self, token_digest: str, *, count_post: bool) -> Awaitable[Any]:
        """Look a user token up in Redis, counting a post against its budget if
        asked: sent at once on the auto-pipeline, else when awaited. Its reply
        goes to `checked_use`."""
        script_keys = [keys.token(token_digest), keys.post_rate(token_digest, int(time.time() // 60))]
        args = [1 if count_post else 0]
        if self._fast is not None:
            script = self._scripts.token_use
            return self._fast.evalsha(script.sha, script.text, script_keys, args)
        return self._scripts.token_use(keys=script_keys, args=args)

    def checked_use(self, token_digest: str, reply: Any) -> Principal:
        """The user of a token from its `use` reply; Unauthorized or RateLimited."""
        raw, uses = reply
        if not raw:
            self._known.pop(token_digest, None)
            raise Unauthorized("unknown, revoked or expired token")
        if uses > self._posts_per_minute:
            raise RateLimited(f"at most {self._posts_per_minute} posts per minute per token")
        who = self._known.get(token_digest)
        if who is None:
            record = orjson.loads(raw)
            who = Principal("user", record["handle"], record["token_id"])
            if len(self._known) >= MAX_KNOWN_TOKENS:
                self._known.clear()
            self._known[token_digest] = who
        return who

    def known(self, token_digest: str) -> Principal | None:
        """Who a token belonged to when last seen (not a check: see MAX_KNOWN_TOKENS)."""
        return self._known.get(token_digest)

    async def require_admin(self, token: str | None) -> Principal:
        who = await self.principal(token)
        if who is None:
            raise Unauthorized("this needs the admin token")
        if not who.is_admin:
            raise Forbidden("this needs the admin token")
        return who

    async def require_user(self, token: str | None, *, count_post: bool = False) -> Principal:
        who = await self.principal(token, count_post=count_post)
        if who is None:
            raise Unauthorized("this needs a user token")
        if who.kind != "user":
            raise Forbidden("this needs a user token")
        return who

    async def require_writer(self, token: str | None) -> Principal:
        """A user or the admin: embed tokens are read-only."""
        who = await self.principal(token)
        if who is None:
            raise Unauthorized("this needs a user token or the admin token")
        if who.kind == "embed":
            raise Forbidden("embed tokens are read-only")
        return who

    async def create_user(self, handle: Any, display_name: Any) -> tuple[dict[str, Any], str, str]:
        if not valid_handle(handle):
            raise BadRequest("handle must match [a-z0-9_]{1,32}")
        if display_name is None:
            display_name = handle
        if not isinstance(display_name, str) or not 0 < len(display_name) <= MAX_DISPLAY_NAME_CHARS:
            raise BadRequest(f"display_name must be a string of 1 to {MAX_DISPLAY_NAME_CHARS} characters")
        user = {"handle": handle, "display_name": display_name, "created_at": int(time.time() * 1000)}
        if not await self._redis.set(keys.user(handle), orjson.dumps(user), nx=True):
            raise Conflict(f"user {handle!r} exists")
        token, token_id = await self.issue_token(handle)
        return user, token, token_id

    async def get_user(self, handle: str) -> dict[str, Any]:
        raw = await self._redis.get(keys.user(handle)) if valid_handle(handle) else None
        if raw is None:
            raise NotFound(f"no user {handle!r}")
        user: dict[str, Any] = orjson.loads(raw)
        return user

    async def issue_token(self, handle: str) -> tuple[str, str]:
        token = USER_TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = secrets.token_urlsafe(9)
        token_digest = digest(token)
        await self._redis.set(keys.token(token_digest), orjson.dumps({"handle": handle, "token_id": token_id}))
        await self._redis.hset(keys.user_tokens(handle), token_id, token_digest)
        return token, token_id

    async def revoke_token(self, handle: str, token_id: str) -> None:
        """Delete the token and tell every gateway to close the sockets using it (4001)."""
        reply = await self._redis.hget(keys.user_tokens(handle), token_id)
        if reply is None:
            raise NotFound("no such token")
        token_digest = store.as_text(reply)
        await self._redis.delete(keys.token(token_digest))
        await self._redis.hdel(keys.user_tokens(handle), token_id)
        self._known.pop(token_digest, None)
        await store.publish(self._redis, keys.CONTROL_CHANNEL, orjson.dumps({"revoked": token_id}))

    @staticmethod
    def may_act_for(who: Principal | None, handle: str) -> None:
        if who is None:
            raise Unauthorized("this needs a token")
        if not (who.is_admin or (who.kind == "user" and who.handle == handle)):
            raise Forbidden("only that user or admin may do this")
