"""streamd.wsframe without sockets: client frames split, unmasked and checked (RFC 6455)."""

from __future__ import annotations

import os
import struct

import pytest

from streamd import wsframe
from streamd.wsframe import Frame, FrameError


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A frame as a client sends it: masked (unless told otherwise)."""
    head = bytes(((0x80 if fin else 0) | rsv | opcode,))
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes((mask_bit | n,))
    elif n < 65536:
        head += bytes((mask_bit | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((mask_bit | 127,)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("size", [0, 1, 5, 125, 126, 1000, 4096])
def test_a_masked_frame_is_split_and_unmasked(size: int) -> None:
    payload = os.urandom(size)
    data = client_frame(wsframe.TEXT, payload) + b"next"
    got = wsframe.split_frame(data, max_size=4096)
    assert got is not None
    frame, end = got
    assert frame == Frame(True, wsframe.TEXT, payload)
    assert data[end:] == b"next"


def test_a_frame_in_pieces_waits_for_the_rest() -> None:
    data = client_frame(wsframe.TEXT, b"x" * 300)
    for cut in range(len(data)):
        assert wsframe.split_frame(data[:cut], max_size=4096) is None
    assert wsframe.split_frame(data, max_size=4096) is not None


@pytest.mark.parametrize("size", [4097, 70_000])
def test_an_oversized_frame_is_refused_from_its_header(size: int) -> None:
    header = client_frame(wsframe.TEXT, b"x" * size)[:14]
    with pytest.raises(FrameError) as err:
        wsframe.split_frame(header, max_size=4096)
    assert err.value.code == wsframe.MESSAGE_TOO_BIG


def test_an_unmasked_client_frame_is_a_protocol_error() -> None:
    with pytest.raises(FrameError) as err:
        wsframe.split_frame(client_frame(wsframe.TEXT, b"hi", masked=False), max_size=4096)
    assert err.value.code == wsframe.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "frame, in_message",
    [
        (Frame(True, wsframe.TEXT | 0x40, b""), False),  # RSV1 without an extension
        (Frame(True, 0x3, b""), False),  # reserved opcode
        (Frame(True, 0xB, b""), False),
        (Frame(False, wsframe.PING, b""), False),  # fragmented control frame
        (Frame(True, wsframe.PING, b"x" * 126), False),  # control frame over 125 bytes
        (Frame(True, wsframe.CONTINUATION, b"x"), False),  # continuation of nothing
        (Frame(True, wsframe.TEXT, b"x"), True),  # a new message inside a fragmented one
    ],
)
def test_frames_that_break_the_rules(frame: Frame, in_message: bool) -> None:
    with pytest.raises(FrameError) as err:
        wsframe.check_frame(frame, in_message)
    assert err.value.code == wsframe.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "frame, in_message",
    [
        (Frame(True, wsframe.TEXT, b"x"), False),
        (Frame(False, wsframe.TEXT, b"x"), False),
        (Frame(True, wsframe.CONTINUATION, b"x"), True),
        (Frame(True, wsframe.PING, b"x" * 125), True),  # control frames may come between fragments
        (Frame(True, wsframe.CLOSE, b""), False),
    ],
)
def test_frames_that_may_come(frame: Frame, in_message: bool) -> None:
    wsframe.check_frame(frame, in_message)


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"", wsframe.NO_STATUS),
        (struct.pack("!H", 1000), 1000),
        (struct.pack("!H", 1001) + "bye é".encode(), 1001),
        (struct.pack("!H", 4000), 4000),
    ],
)
def test_close_codes_are_read(payload: bytes, code: int) -> None:
    assert wsframe.parse_close(payload) == code


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\x03", wsframe.PROTOCOL_ERROR),
        (struct.pack("!H", 1005), wsframe.PROTOCOL_ERROR),
        (struct.pack("!H", 1006), wsframe.PROTOCOL_ERROR),
        (struct.pack("!H", 999), wsframe.PROTOCOL_ERROR),
        (struct.pack("!H", 2000), wsframe.PROTOCOL_ERROR),
        (struct.pack("!H", 1000) + b"\xff\xfe", wsframe.INVALID_DATA),
    ],
)
def test_bad_close_frames(payload: bytes, code: int) -> None:
    with pytest.raises(FrameError) as err:
        wsframe.parse_close(payload)
    assert err.value.code == code


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_server_text_frames_are_unmasked_with_the_right_length(size: int) -> None:
    frame = wsframe.text_frame(b"a" * size)
    assert frame[0] == 0x81 and not frame[1] & 0x80
    assert frame.endswith(b"a" * size) if size else len(frame) == 2


def test_a_close_reason_is_cut_to_fit_a_control_frame() -> None:
    frame = wsframe.close_frame(4008, "é".encode() * 100)
    assert len(frame) <= 2 + 125
    assert struct.unpack("!H", frame[2:4]) == (4008,)
    frame[4:].decode()  # cut on a character boundary
