"""One exception root and the one table that maps errors to the wire.

    StreamdError                 code, HTTP status, message, optional feed/ref
    ├── BadRequest               400 bad_request
    ├── Unauthorized             401 unauthorized
    ├── Forbidden                403 forbidden
    ├── NotFound                 404 not_found
    ├── Conflict                 409 conflict
    ├── PayloadTooLarge          413 payload_too_large
    ├── RateLimited              429 rate_limited
    ├── TooManySubscriptions     400 too_many_subscriptions (socket only)
    └── Unavailable              503 unavailable

`CloseCode` holds the WebSocket close codes of the protocol.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TOKEN_REVOKED = 4001
    TOO_SLOW = 4008
    RATE_LIMITED = 4029


class StreamdError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, *, feed: str | None = None, ref: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.feed = feed
        self.ref = ref

    def body(self) -> dict[str, Any]:
        """The HTTP error body of the protocol."""
        return {"error": {"code": self.code, "message": self.message}}

    def frame(self) -> dict[str, Any]:
        """The WebSocket `error` frame of the protocol."""
        out: dict[str, Any] = {"op": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            out["ref"] = self.ref
        if self.feed is not None:
            out["feed"] = self.feed
        return out


class BadRequest(StreamdError):
    code, status = "bad_request", 400


class Unauthorized(StreamdError):
    code, status = "unauthorized", 401


class Forbidden(StreamdError):
    code, status = "forbidden", 403


class NotFound(StreamdError):
    code, status = "not_found", 404


class Conflict(StreamdError):
    code, status = "conflict", 409


class PayloadTooLarge(StreamdError):
    code, status = "payload_too_large", 413


class RateLimited(StreamdError):
    code, status = "rate_limited", 429


class TooManySubscriptions(StreamdError):
    code, status = "too_many_subscriptions", 400


class Unavailable(StreamdError):
    code, status = "unavailable", 503


# HTTP statuses raised by aiohttp itself (unknown route, body too large...)
# mapped onto the protocol's codes.
_BY_STATUS: dict[int, type[StreamdError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: BadRequest,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}


def from_status(status: int, message: str) -> StreamdError:
    """The protocol error for an HTTP status produced outside streamd's handlers."""
    cls = _BY_STATUS.get(status, BadRequest if 400 <= status < 500 else Unavailable)
    err = cls(message)
    if status == 405:
        err.status = 405
    return err
