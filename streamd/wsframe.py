"""Server-to-client WebSocket frames (RFC 6455), built once and written many times.

Frames from a server are never masked, so one frame's bytes can go to every
subscriber's transport unchanged.
"""

from __future__ import annotations

import struct

_TEXT_FIN = 0x81


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((_TEXT_FIN, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", _TEXT_FIN, 126, n) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, n) + payload
