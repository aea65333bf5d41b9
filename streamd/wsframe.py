"""WebSocket frames (RFC 6455), sans I/O: server frames built, client frames split.

Frames from a server are never masked, so one frame's bytes can go to every
subscriber's transport unchanged. Frames from a client are always masked;
`split_frame` cuts one off the front of a buffer and unmasks it, and
`check_frame` says whether it may be accepted (RFC 6455 sections 5.2-5.5).
Assembling fragments and answering control frames is the socket's job
(`streamd.wssocket`).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

# Close codes of the protocol itself (ours are in streamd.errors.CloseCode).
NORMAL = 1000
PROTOCOL_ERROR = 1002
NO_STATUS = 1005  # a close frame without a code (never sent)
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009

_TEXT_FIN = 0x81
_KNOWN_OPCODES = frozenset((CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG))


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((_TEXT_FIN, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _TEXT_FIN, 126, n) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, n) + payload


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A ping, pong or close frame (payloads of control frames are at most 125 bytes)."""
    return bytes((0x80 | opcode, len(payload))) + payload[:125]


def close_frame(code: int, reason: bytes = b"") -> bytes:
    # A reason is cut to fit the 125 bytes of a control frame, on a character boundary.
    reason = reason[:123].decode("utf-8", "ignore").encode()
    return control_frame(CLOSE, struct.pack("!H", code) + reason)


PING_FRAME = control_frame(PING)


class FrameError(Exception):
    """The peer broke the protocol: fail the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Frame(NamedTuple):
    fin: bool
    opcode: int
    payload: bytes


def split_frame(buf: bytes, max_size: int) -> tuple[Frame, int] | None:
    """The first frame of `buf` (unmasked) and its length on the wire, or None
    if `buf` does not hold all of it yet.

    Raises FrameError before buffering a frame that could never be accepted:
    one longer than `max_size` (1009), or not masked (1002).
    """
    n = len(buf)
    if n < 2:
        return None
    b0, b1 = buf[0], buf[1]
    length = b1 & 0x7F
    pos = 2
    if length == 126:
        if n < 4:
            return None
        length = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif length == 127:
        if n < 10:
            return None
        length = int.from_bytes(buf[2:10], "big")
        pos = 10
    if not b1 & 0x80:
        raise FrameError(PROTOCOL_ERROR, "client frames must be masked")
    if length > max_size:
        raise FrameError(MESSAGE_TOO_BIG, f"frame over {max_size} bytes")
    end = pos + 4 + length
    if n < end:
        return None
    mask = buf[pos : pos + 4]
    payload = unmask(buf[pos + 4 : end], mask)
    return Frame(bool(b0 & 0x80), b0 & 0x7F, payload), end  # RSV bits kept in the opcode: check_frame refuses them


def unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def check_frame(frame: Frame, in_message: bool) -> None:
    """Raise FrameError if `frame` may not come now; `in_message`: a fragmented
    message is under way."""
    opcode = frame.opcode
    if opcode & 0x70:
        raise FrameError(PROTOCOL_ERROR, "no extension was negotiated (RSV bits set)")
    if opcode not in _KNOWN_OPCODES:
        raise FrameError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
    if opcode >= CLOSE:
        if not frame.fin or len(frame.payload) > 125:
            raise FrameError(PROTOCOL_ERROR, "control frames are short and never fragmented")
    elif opcode == CONTINUATION:
        if not in_message:
            raise FrameError(PROTOCOL_ERROR, "a continuation frame outside a message")
    elif in_message:
        raise FrameError(PROTOCOL_ERROR, "a new message inside a fragmented one")


def parse_close(payload: bytes) -> int:
    """The code of a client's close frame (NO_STATUS if it has none)."""
    if not payload:
        return NO_STATUS
    if len(payload) == 1:
        raise FrameError(PROTOCOL_ERROR, "a close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not (3000 <= code < 5000 or (1000 <= code <= 1014 and code not in (1004, 1005, 1006))):
        raise FrameError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_DATA, "the close reason is not UTF-8") from None
    return code
