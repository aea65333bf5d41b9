"""Users and tokens: who is calling.

Tokens are random and stored only as their SHA-256; a token record names its
user and its token id (the handle used to revoke it).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from streamd import keys
from streamd.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from streamd.feeds import valid_handle

USER_TOKEN_PREFIX = "sdu_"
MAX_DISPLAY_NAME_CHARS = 64


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "admin" or "user"
    handle: str | None = None
    token_id: str | None = None

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


class Auth:
    def __init__(self, client: aioredis.Redis, admin_token: str | None) -> None:
        self._redis = client
        self._admin_token = admin_token

    async def principal(self, token: str | None) -> Principal | None:
        """The caller for a token; None when no token was given; Unauthorized if unknown."""
        if token is None:
            return None
        if self._admin_token and hmac.compare_digest(token.encode(), self._admin_token.encode()):
            return ADMIN
        if token.startswith(USER_TOKEN_PREFIX):
            raw = await self._redis.get(keys.token(digest(token)))
            if raw is not None:
                record = orjson.loads(raw)
                return Principal("user", record["handle"], record["token_id"])
        raise Unauthorized("unknown, revoked or expired token")

    async def require_admin(self, token: str | None) -> Principal:
        who = await self.principal(token)
        if who is None:
            raise Unauthorized("this needs the admin token")
        if not who.is_admin:
            raise Forbidden("this needs the admin token")
        return who

    async def require_user(self, token: str | None) -> Principal:
        who = await self.principal(token)
        if who is None:
            raise Unauthorized("this needs a user token")
        if who.kind != "user":
            raise Forbidden("this needs a user token")
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
        token_digest = await self._redis.hget(keys.user_tokens(handle), token_id)
        if token_digest is None:
            raise NotFound("no such token")
        await self._redis.delete(keys.token(token_digest.decode()))
        await self._redis.hdel(keys.user_tokens(handle), token_id)

    @staticmethod
    def may_act_for(who: Principal | None, handle: str) -> None:
        if who is None:
            raise Unauthorized("this needs a token")
        if not (who.is_admin or who.handle == handle):
            raise Forbidden("only that user or admin may do this")
