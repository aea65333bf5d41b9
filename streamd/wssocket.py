"""One upgraded WebSocket: RFC 6455 over its transport, with no task while it is idle.

aiohttp answers the upgrade request (`gateway.websocket_handler`); then the
socket's transport is handed to a `WebSocket`, the asyncio protocol that reads
the client's frames from then on. An idle socket is this one object (also the
hub's `Connection` for it) and its transport: no reader task, no queue, no
coroutine frame, no timer. Pings and heartbeats come from the hub's one timer,
which calls `keepalive`.

Client frames are split and checked by `streamd.wsframe` (sans I/O); here they
are assembled into messages and answered:

- a text message goes to the socket's `Session`. One at a time and in order:
  while an op awaits (a subscribe reads the history), reading is paused and
  later frames wait in the buffer, as they waited in aiohttp's queue before.
- a binary message is refused with close 1003; a message or frame over
  `max_size` with 1009; invalid UTF-8 with 1007; any other breach of the
  framing rules (unmasked, RSV bits, unknown opcode, bad fragmentation, bad
  control frames) with 1002. Those fail the connection: the close frame is
  sent and the transport closed without waiting for the client's answer.
- ping: pong with the same payload. Any data from the client counts as
  proof of life, a pong included.
- close from the client: the same code is echoed and the transport closed.
  A close the server starts (`close`) waits for the client's close frame, and
  the hub bounds that wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from streamd import wsframe
from streamd.errors import CloseCode
from streamd.hub import Connection, Hub
from streamd.wsframe import FrameError

if TYPE_CHECKING:
    from streamd.gateway import Session

log = logging.getLogger("streamd.gateway")

INTERNAL_ERROR = 1011


class WebSocket(Connection, asyncio.Protocol):
    __slots__ = (
        "hub",
        "session",
        "max_size",
        "_buf",
        "_fragments",
        "_busy",
        "_state",
        "_closed_waiter",
        "heard",
        "quiet_since",
        "ping_sent",
    )

    # _state: what is known of the closing handshake.
    OPEN, CLOSE_SENT, CLOSE_RECEIVED, FAILED, LOST = range(5)

    def __init__(self, hub: Hub, transport: asyncio.Transport, max_size: int, now: float) -> None:
        super().__init__(None, transport)
        self.hub = hub
        self.session: Session | None = None
        self.max_size = max_size
        self._buf = b""
        self._fragments: list[bytes] | None = None  # a fragmented message under way: its opcode's frame first
        self._busy: asyncio.Future[None] | None = None  # the op being answered
        self._state = WebSocket.OPEN
        self._closed_waiter: asyncio.Future[None] | None = None
        # Liveness, read by the hub's timer: `heard` is set on any data from the client.
        self.heard = False
        self.quiet_since = now
        self.ping_sent = 0.0  # when the unanswered ping went out; 0: none is

    @property
    def ws(self) -> WebSocket:  # type: ignore[override]
        return self

    # -- asyncio.Protocol ---------------------------------------------------------

    def start(self, early: bytes) -> None:
        """Begin with what the client sent right behind its upgrade request."""
        if early:
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self._state != WebSocket.OPEN and self._state != WebSocket.CLOSE_SENT:
            return  # after the client's close frame, or a failure: nothing more is read
        buf = self._buf + data if self._buf else data
        if self._busy is not None:
            self._buf = buf  # in flight before reading paused; read when the op is answered
            return
        self._read(buf)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = WebSocket.LOST
        self._buf = b""
        self._fragments = None
        if not self.closed:
            self.hub.remove(self)
        waiter = self._closed_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.session = None

    # -- reading ------------------------------------------------------------------

    def _read(self, buf: bytes) -> None:
        max_size = self.max_size
        try:
            while buf and self._busy is None and self._state <= WebSocket.CLOSE_SENT:
                got = wsframe.split_frame(buf, max_size)
                if got is None:
                    break
                frame, end = got
                buf = buf[end:]
                self._on_frame(frame)
        except FrameError as err:
            self._fail(err.code, str(err))
            return
        self._buf = buf

    def _on_frame(self, frame: wsframe.Frame) -> None:
        wsframe.check_frame(frame, self._fragments is not None)
        opcode = frame.opcode
        if opcode == wsframe.PING:
            transport = self.transport
            transport.write(wsframe.control_frame(wsframe.PONG, frame.payload))
            if transport.get_write_buffer_size() > self.hub.buffer_limit:
                self.hub.kill(self, CloseCode.TOO_SLOW)  # pings from a client that does not read its pongs
        elif opcode == wsframe.PONG:
            pass  # `heard` is already set
        elif opcode == wsframe.CLOSE:
            self._on_close(wsframe.parse_close(frame.payload))
        elif frame.fin and opcode != wsframe.CONTINUATION:
            self._on_message(opcode, frame.payload)
        else:
            parts = self._fragments
            if parts is None:
                parts = self._fragments = [bytes((opcode,))]
            parts.append(frame.payload)
            if sum(map(len, parts)) - 1 > self.max_size:
                raise FrameError(wsframe.MESSAGE_TOO_BIG, f"message over {self.max_size} bytes")
            if frame.fin:
                self._fragments = None
                self._on_message(parts[0][0], b"".join(parts[1:]))

    def _on_message(self, opcode: int, payload: bytes) -> None:
        if self.closed:
            return  # the hub is closing the socket: its ops are no longer answered
        if opcode == wsframe.BINARY:
            self.hub.kill(self, CloseCode.UNSUPPORTED_DATA, "binary frames are not supported; send JSON text")
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            raise FrameError(wsframe.INVALID_DATA, "a text frame that is not UTF-8") from None
        session = self.session
        assert session is not None
        if not session.within_rate(time.monotonic()):
            return
        op = session.receive(text)
        if op is None or session.answer_now(op):
            return
        # An op that awaits: the next frames wait until it is answered.
        self._busy = busy = asyncio.ensure_future(session.run(op))
        busy.add_done_callback(self._answered)
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def _answered(self, task: asyncio.Future[None]) -> None:
        self._busy = None
        if not task.cancelled() and task.exception() is not None:
            # The socket is upgraded: an HTTP error page can no longer be sent.
            log.error("websocket session failed", exc_info=task.exception())
            self.hub.kill(self, INTERNAL_ERROR, "internal error")
        if self._state == WebSocket.LOST or self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self._buf:
            self._read(self._buf)

    # -- closing ------------------------------------------------------------------

    def _on_close(self, code: int) -> None:
        """The client's close frame: an answer to ours, or its own close."""
        state = self._state
        self._state = WebSocket.CLOSE_RECEIVED
        transport = self.transport
        if state == WebSocket.OPEN:
            if not self.closed:
                self.hub.remove(self)
            no_code = code == wsframe.NO_STATUS
            transport.write(wsframe.control_frame(wsframe.CLOSE) if no_code else wsframe.close_frame(code))
        if transport.get_write_buffer_size():
            transport.abort()  # it said goodbye and does not read: what is left would never get through
        else:
            transport.close()
        waiter = self._closed_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close with `code`, not waiting for its answer."""
        self._buf = b""
        self._fragments = None
        if self.closed:  # already closing: nothing more to say
            self._state = WebSocket.FAILED
            self.transport.close()
            return
        self._state = WebSocket.FAILED
        self.hub.kill(self, code, reason)

    async def close(self, code: int, message: bytes = b"") -> None:
        """Send a close frame and wait for the client's (or for the connection to end).

        The hub calls this, with a time limit, after it has dropped the socket."""
        state = self._state
        if state == WebSocket.LOST:
            return
        if state in (WebSocket.OPEN, WebSocket.FAILED):
            self.transport.write(wsframe.close_frame(code, message))
            if state == WebSocket.OPEN:
                self._state = WebSocket.CLOSE_SENT
        if self._state != WebSocket.CLOSE_SENT:
            self.transport.close()  # nothing more will be read: end the connection once the frame is out
        if self._closed_waiter is None:
            self._closed_waiter = asyncio.get_running_loop().create_future()
        await self._closed_waiter

    # -- liveness (the hub's timer) -------------------------------------------------

    def keepalive(self, now: float, ping_every: float, pong_within: float) -> bool:
        """Whether to ping now: after `ping_every` seconds without a word from
        the client (the hub writes the ping). A client that says nothing within
        `pong_within` of a ping is dropped."""
        if self.heard:
            self.heard = False
            self.quiet_since = now
            self.ping_sent = 0.0
        elif self.ping_sent:
            if now - self.ping_sent >= pong_within:
                self.hub.remove(self)
                transport = self.transport
                # A peer that reads nothing would hold a graceful close forever.
                if transport.get_write_buffer_size():
                    transport.abort()
                else:
                    transport.close()
        elif now - self.quiet_since >= ping_every:
            self.ping_sent = now
            return True
        return False
